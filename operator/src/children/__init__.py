"""TrainJob -> child manifests. Pure: no API calls, no clock, no randomness.

Every child has a deterministic name, kontrast labels only and a controller ownerReference to
the TrainJob, so deleting the TrainJob garbage-collects everything (see :mod:`.names`).

Children of a TrainJob ``tj`` (names shortened with a hash when a name would be too long):

=================  ====================  =====================================================
kind               name                  purpose
=================  ====================  =====================================================
ServiceAccount     ``tj-trainer``        identity of the training pods
Role/RoleBinding   ``tj-trainer``        get + patch on ``trainjobs/status`` of this job only
Service            ``tj-workers``        headless; stable DNS ``<job>-<index>.tj-workers``
ConfigMap          ``tj-trainjob``       the TrainJob manifest, spec unchanged
Job (batch/v1)     ``tj-<attempt>``      Indexed, ``nodes`` pods; a new attempt per restart
=================  ====================  =====================================================

Modules: ``names`` (names, labels, the metadata every child carries), ``base`` (the first five
rows), ``pod`` (the training pod: settings in three layers, volumes, container, env), ``job``
(the worker Job, and :func:`.job.children`: all of an attempt's children).
"""
