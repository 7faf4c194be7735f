"""What training, generation and evaluation share, so that the dependency arrows point one way
(Generation/ -> common/ <- eval/): errors (one-line user errors), fileio (atomic writes, safe loading of
untrusted files), cli (flags in both spellings, help with defaults), data / dataset / imagefolder (NIfTI and
image datasets, preprocessing and the slice cache), features (the RadImageNet network and pretrained-weights
resolution), grid (image grids)."""
