//! edgelorad's library: model loading, the multi-LoRA engine and the command line.
