"""kontrast: Kubernetes-native fine-tuning of multimodal retrieval embeddings."""

__version__ = "0.1.0"
