"""The CUDA path: fused ConvAttn (cupy), FlexAttention/FlashBias window attention, a stream/pinned-buffer scheduler.

Importing this package never imports cupy: CPU-only installs (and CI) use the parts that run anywhere — the kernel
emulation, the scheduler with a fake device, the attention back-ends' math. cupy comes with `esc-stream[cuda]`.
"""
