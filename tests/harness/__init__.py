"""Test harness: a real Kubernetes control plane on loopback and a node agent that runs pods
as local processes, the S3 server, and an image server that misbehaves on request. Test code
only; nothing here ships with kontrast."""
