"""Real image-text data: loaders (Karpathy JSON + image folder, sharded webdataset tars, tfds
random-access sources, unpaired image folders / text files) that all yield `records.PairedRecord`,
and the grain pipelines that decode, crop, normalise and tokenise them (`pipeline.py`)."""
