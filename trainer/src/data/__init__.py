"""Reading the training data: tables parsed and checked, the node-shared table, images, datasets and batches."""
