-- Argo CD health check for kontrast.dev/TrainJob.
-- Install: in the argocd-cm ConfigMap, under the key
--   resource.customizations.health.kontrast.dev_TrainJob
-- Succeeded -> Healthy, Failed -> Degraded, Suspended -> Suspended, anything else -> Progressing.
local hs = {}
hs.status = "Progressing"
hs.message = "Waiting for the operator"
if obj.status ~= nil then
  local phase = obj.status.phase
  local message = obj.status.message
  if obj.status.conditions ~= nil then
    for _, condition in ipairs(obj.status.conditions) do
      if condition.type == "Failed" and condition.status == "True" then
        phase = "Failed"
        message = condition.message or message
      end
    end
  end
  if phase == "Succeeded" then
    hs.status = "Healthy"
  elseif phase == "Failed" then
    hs.status = "Degraded"
  elseif phase == "Suspended" then
    hs.status = "Suspended"
  else
    hs.status = "Progressing"
  end
  if message ~= nil and message ~= "" then
    hs.message = message
  elseif phase ~= nil then
    hs.message = phase
  end
end
return hs
