"""The parts of generate.py, one concern each: models (loading a run or checkpoint for sampling, batch
invariance), conditions (mask filter, class plans, real conditioning), writers (files, manifest, previews).
The pipeline that puts them together is core/generate.py."""
