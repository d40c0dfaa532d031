"""kontrast.trainer: weighted multi-field contrastive fine-tuning of open_clip models.

``kontrast train FILE`` (and ``torchrun -m kontrast.trainer FILE``) runs ``__main__.main``.
One job per module:

spec        TrainJob -> resolved values (model-dependent beta2/eps, paths, pvc:// URIs)
table       CSV/TSV/Parquet read by pyarrow, vectorised checks, ids, the node-shared mapped table
images      image fetching with retries, the node-local image cache, the prefetch, the bad-image policy
data        loading (table + prefetch + policy), the Dataset, uint8 transforms, the DataLoader
model       open_clip model/transforms/tokenizer, poolingMethod (a correct max pooler), logit init
fusion      multi-field embeddings (normalise, weighted sum, normalise) as one DDP module
train       the loop: resume, evaluate, epochs, checkpoints, summary
schedule    learning-rate schedules          precision   what each precision value means
checkpoint  atomic checkpoints, resume       storage     local / PVC / object-store writes
evaluate    nDCG@10, MRR@10, Recall@10, mAP  report      progress reporters (terminal, JSONL)
errors      permanent errors (exit 78)       exampledata the synthetic example data set
losses, distributed, locks, memory: exact distributed losses, DDP, locks, accumulation
launch, status_reporter: torchrun inside pods and the cluster-status reporter
"""
