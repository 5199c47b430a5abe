"""Data: raw sources -> prepared MDS datasets -> streaming TorchRec batches."""
