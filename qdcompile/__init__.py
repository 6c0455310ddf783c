"""qdcompile: post-training quantization of diffusion U-Nets with real integer kernels."""
