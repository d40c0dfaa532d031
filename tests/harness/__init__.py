"""Test harness: a real Kubernetes control plane on loopback and a node agent that runs pods
as local processes. Test code only; nothing here ships with kontrast."""
