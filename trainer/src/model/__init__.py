"""The model: open_clip built from the TrainJob, its text towers, multi-field fusion, and what is locked."""
