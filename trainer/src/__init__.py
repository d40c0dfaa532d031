"""kontrast.trainer: weighted multi-field contrastive fine-tuning of open_clip models.

``kontrast train FILE`` (and ``torchrun -m kontrast.trainer FILE``) runs ``cli.train.main``.
The packages follow the data, from the TrainJob to the shipped model:

data/        a row parsed (read), checked (check), shared per node (shared_table, examples);
             images fetched and cached (images); loading with the bad-image policy (load);
             transforms, the Dataset (dataset), the rows with their mined negatives
             (with_negatives), the steps' rows and the DataLoader (batches); the synthetic
             example data set (example_data)
model/       the open_clip model built (build) from a config JSON or pretrained weights
             (sources), Hugging Face text towers and the tokenizer (text), multi-field
             fusion (fusion), locked layers and the optimizer's groups (locks)
step/        one optimizer step (train_step): the losses (losses), the known pairs
             (known_pairs), feature-caching accumulation (accumulation), the micro-batch
             search (micro_batch), the learning-rate schedule (schedule)
mining/      hard negatives: which to take per query (negatives), the mining pass and its
             cache (mine)
run/         a run orchestrated (train): setup, progress and resume (state), the epochs
             (epoch), evaluations during the run (evaluations), mining when due (mining),
             saving (save, checkpoint, save_policy), the summary (summary)
evaluation/  the eval set (eval_set), evaluating a model (evaluate), sharded top-k (topk), the ranking
             metrics (metrics), ``kontrast evaluate``'s job (job)
report/      progress reporters (reporters: terminal, progress.jsonl), the TrainJob's status
             in a cluster (cluster_status), TensorBoard (tensorboard), MLflow tracking and the
             model registry (mlflow_tracking)
ship/        the exported model (export) and its card (model_card), the HTML report
             (report_page) and its gallery, a run's files read back (run_files)
cli/         ``kontrast train`` (train), ``kontrast evaluate`` (evaluate), ``kontrast launch``
             (launch), exit codes and the termination log (exits), SIGUSR1's stack dumps of
             a run that seems stuck (stack_dumps)

Shared by all: spec (a TrainJob resolved), params (typed parameters), layout (the output and
cache folders), storage (local / PVC / object-store writes), locations, distributed
(process group and collectives), precision, errors (permanent errors, exit 78).
"""
