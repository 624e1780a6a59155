"""clipkit: contrastive image-text embeddings and cross-modal retrieval."""

__version__ = "0.1.0"

from clipkit.encode import encode
from clipkit.errors import ClipkitError
from clipkit.index import Index
from clipkit.metrics import recall_at_k
from clipkit.models import Model, list_models, load_model
from clipkit.rerankers import Reranker, load_reranker, score_pairs
from clipkit.search import Hit, search

__all__ = ["ClipkitError", "Hit", "Index", "Model", "Reranker", "__version__", "encode", "list_models", "load_model",
           "load_reranker", "recall_at_k", "score_pairs", "search"]
