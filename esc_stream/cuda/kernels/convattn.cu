// Fused ConvAttn for the ESC family: one kernel per ConvAttn instead of conv2d + per-sample depthwise conv + add.
//
// This file is read at run time by esc_stream/cuda/convattn.py and compiled by cupy (NVRTC) on a GPU. The test
// suite compiles the very same text for the CPU with g++ behind kernels/emu.h (threads of a block are real
// threads, __syncthreads is a barrier), and with `nvcc -arch=sm_80 -ptx`, so only portable C++ is used here:
// no CUDA headers, no intrinsics, float arithmetic only (half inputs are widened by the caller).
//
// Layouts (all contiguous, float32):
//   x    (B, C_in, H, W)  only channels [0, P) are read; `x_bstride` elements between images
//   out  (B, C_out, H, W) only channels [0, P) are written; `out_bstride` elements between images
//   dyn  (B, P, 3, 3)     the instance-dependent 3x3 depthwise kernels (dwc_proj / proj output)
//   ESC:    lk (P, P, K, K)          shared large kernel, already geometric-ensembled (baked)
//   ESC-FP: lk_channel (P, P), lk_spatial (P, K, K): a 1x1 channel mix followed by a depthwise KxK kernel
// Both add the dynamic 3x3 kernel into the centre of the large kernel while it is staged in shared memory, so the
// dynamic convolution costs no extra pass over the image (ESC-FP's folding, applied to ESC's diagonal as well).
//
// Launch (see convattn.py, which computes the same geometry for cupy and for the CPU tests):
//   block (CA_TILE, CA_TILE); grid (ceil(W / CA_TILE), ceil(H / CA_TILE), B * groups)
//   convattn_dense: groups = ceil(P / CA_OCB), each block makes CA_OCB output channels of one tile
//   convattn_fp:    groups = P, each block makes one output channel of one tile

#ifndef CA_TILE
#define CA_TILE 16  // output tile side in pixels; a block has CA_TILE * CA_TILE threads, one per pixel
#endif
#ifndef CA_OCB
#define CA_OCB 8  // output channels per block in convattn_dense (accumulators held by each thread)
#endif
#ifndef CA_MAX_K
#define CA_MAX_K 15  // largest supported large-kernel side (ESC uses 13)
#endif
#define CA_SIDE_MAX (CA_TILE + CA_MAX_K - 1)

// Weight of tap (ky, kx) of a KxK kernel plus, inside the centred 3x3 window, the dynamic kernel's tap.
__device__ __forceinline__ float ca_fold(float w, const float* __restrict__ dyn3x3, int tap, int k) {
    const int r = k / 2;
    const int dy = tap / k - r + 1;
    const int dx = tap % k - r + 1;
    if (dy >= 0 && dy < 3 && dx >= 0 && dx < 3) {
        w += dyn3x3[dy * 3 + dx];
    }
    return w;
}

extern "C" __global__ void convattn_dense(const float* __restrict__ x, const float* __restrict__ lk,
                                          const float* __restrict__ dyn, float* __restrict__ out, int p, int h,
                                          int w, int k, long long x_bstride, long long out_bstride) {
    __shared__ float tile[CA_SIDE_MAX * CA_SIDE_MAX];
    __shared__ float wts[CA_OCB * CA_MAX_K * CA_MAX_K];

    const int groups = (p + CA_OCB - 1) / CA_OCB;
    const int b = (int)blockIdx.z / groups;
    const int o0 = ((int)blockIdx.z % groups) * CA_OCB;
    const int tx = (int)threadIdx.x;
    const int ty = (int)threadIdx.y;
    const int tid = ty * CA_TILE + tx;
    const int r = k / 2;
    const int side = CA_TILE + k - 1;
    const int kk = k * k;
    const int left = (int)blockIdx.x * CA_TILE - r;
    const int top = (int)blockIdx.y * CA_TILE - r;
    const long long plane = (long long)h * w;
    const float* __restrict__ xb = x + (long long)b * x_bstride;

    float acc[CA_OCB];
    for (int j = 0; j < CA_OCB; ++j) {
        acc[j] = 0.0f;
    }
    for (int i = 0; i < p; ++i) {
        __syncthreads();  // every thread is done with channel i - 1's tile and weights
        const float* __restrict__ xc = xb + (long long)i * plane;
        for (int t = tid; t < side * side; t += CA_TILE * CA_TILE) {
            const int yy = top + t / side;
            const int xx = left + t % side;
            tile[t] = (yy >= 0 && yy < h && xx >= 0 && xx < w) ? xc[(long long)yy * w + xx] : 0.0f;
        }
        for (int t = tid; t < CA_OCB * kk; t += CA_TILE * CA_TILE) {
            const int o = o0 + t / kk;
            const int tap = t % kk;
            float v = 0.0f;
            if (o < p) {
                v = lk[((long long)o * p + i) * kk + tap];
                if (o == i) {  // the dynamic kernel is depthwise: it lives on the large kernel's diagonal
                    v = ca_fold(v, dyn + ((long long)b * p + o) * 9, tap, k);
                }
            }
            wts[t] = v;
        }
        __syncthreads();
        for (int ky = 0; ky < k; ++ky) {
            for (int kx = 0; kx < k; ++kx) {
                const float v = tile[(ty + ky) * side + tx + kx];
                const int tap = ky * k + kx;
                for (int j = 0; j < CA_OCB; ++j) {
                    acc[j] += wts[j * kk + tap] * v;
                }
            }
        }
    }
    const int ox = (int)blockIdx.x * CA_TILE + tx;
    const int oy = (int)blockIdx.y * CA_TILE + ty;
    if (ox < w && oy < h) {
        float* __restrict__ ob = out + (long long)b * out_bstride + (long long)oy * w + ox;
        for (int j = 0; j < CA_OCB; ++j) {
            if (o0 + j < p) {
                ob[(long long)(o0 + j) * plane] = acc[j];
            }
        }
    }
}

extern "C" __global__ void convattn_fp(const float* __restrict__ x, const float* __restrict__ lk_channel,
                                       const float* __restrict__ lk_spatial, const float* __restrict__ dyn,
                                       float* __restrict__ out, int p, int h, int w, int k, long long x_bstride,
                                       long long out_bstride) {
    __shared__ float tile[CA_SIDE_MAX * CA_SIDE_MAX];
    __shared__ float wts[CA_MAX_K * CA_MAX_K];

    const int b = (int)blockIdx.z / p;
    const int o = (int)blockIdx.z % p;
    const int tx = (int)threadIdx.x;
    const int ty = (int)threadIdx.y;
    const int tid = ty * CA_TILE + tx;
    const int r = k / 2;
    const int side = CA_TILE + k - 1;
    const int kk = k * k;
    const int left = (int)blockIdx.x * CA_TILE - r;
    const int top = (int)blockIdx.y * CA_TILE - r;
    const long long plane = (long long)h * w;
    const float* __restrict__ xb = x + (long long)b * x_bstride;
    const float* __restrict__ mix = lk_channel + (long long)o * p;

    // Stage the 1x1 channel mix of the tile (zero outside the image: the mix has no bias, so this equals
    // zero-padding the mixed image) and this channel's large kernel with the dynamic kernel folded in.
    for (int t = tid; t < side * side; t += CA_TILE * CA_TILE) {
        const int yy = top + t / side;
        const int xx = left + t % side;
        float v = 0.0f;
        if (yy >= 0 && yy < h && xx >= 0 && xx < w) {
            const float* __restrict__ px = xb + (long long)yy * w + xx;
            for (int i = 0; i < p; ++i) {
                v += mix[i] * px[(long long)i * plane];
            }
        }
        tile[t] = v;
    }
    for (int t = tid; t < kk; t += CA_TILE * CA_TILE) {
        wts[t] = ca_fold(lk_spatial[(long long)o * kk + t], dyn + ((long long)b * p + o) * 9, t, k);
    }
    __syncthreads();
    float acc = 0.0f;
    for (int ky = 0; ky < k; ++ky) {
        for (int kx = 0; kx < k; ++kx) {
            acc += wts[ky * k + kx] * tile[(ty + ky) * side + tx + kx];
        }
    }
    const int ox = (int)blockIdx.x * CA_TILE + tx;
    const int oy = (int)blockIdx.y * CA_TILE + ty;
    if (ox < w && oy < h) {
        out[(long long)b * out_bstride + (long long)o * plane + (long long)oy * w + ox] = acc;
    }
}
