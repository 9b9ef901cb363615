"""Outside formats: model sources (checkpoints, sharded folders, Hugging Face folders), safetensors
files read a block at a time, and Hugging Face folders written."""
