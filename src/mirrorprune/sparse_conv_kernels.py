"""numba kernels of the sparse convolution — and of `SparseLinear` at batch >= 16, at the end
(imported only when numba is installed).

Layout ("padded planes"): an activation is an ordinary contiguous NCHW float32 tensor whose
planes carry a zero border of P pixels. A convolution with padding p <= P then reads its
input without bounds checks: output pixel (y, x) of output channel o is

    sum over the nonzeros (c, ky, kx, w) of row o:  w * src[c][q + offset(c, ky, kx)],
    q = y * width + x,

over the flattened source planes, so each nonzero weight is one long contiguous
multiply-add over a plane ("flat padded" trick: the positions that fall into the border
columns compute garbage that the epilogue skips). Stride 2 reads four sub-sampled copies of
the input (phases), which turns it into the stride-1 case. The epilogue adds the bias
(BatchNorm folded in), the residual and the ReLU, and writes the interior of the padded
output plane; the border is never written (the caller hands over zeroed borders).

Offsets are unsigned: LLVM vectorizes `s[q + d]` only when it can prove the index does not
wrap (signed offsets run ~20x slower; issue 17).

Layout for batches of 16 and more ("blocked"): (groups of 16 images, C, H, W, 16), the same
zero border, every pixel one 64-byte vector of 16 images. `sparse_conv_blocked` sums each
nonzero's contribution to four consecutive pixels of one output row in four vector registers
(`_strip`: an LLVM loop, since numba keeps such accumulators in memory) and writes them once:
every load is an aligned 64-byte vector and the source rows stay in L1 across all output
channels. Stride 2 reads every other pixel straight from the input (no sub-sampled
copies). Per layer of a 95%-sparse ResNet-20 at batch 64, one thread: 1.4x (first stage) to
2.7x (last) faster than the planes kernel.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types, uint64
from numba.core import cgutils
from numba.extending import intrinsic

_FLAGS = {"fastmath": True, "cache": True, "nogil": True, "boundscheck": False}


@njit(**_FLAGS)
def _aligned(length):  # pragma: no cover - compiled
    """An empty float32 array starting on a 64-byte boundary (the accumulator: its vector
    stores would split across cache lines otherwise)."""
    raw = np.empty(length + 16, np.float32)
    k = ((64 - raw.ctypes.data % 64) % 64) // 4
    return raw[k:k + length]


@njit(**_FLAGS)
def sparse_conv(src, out, res, indptr, chan, off, val, bias, lo, src_img, src_plane, width,
                length, res_img, res_plane, res_w, res_pad, n_img, n_out, out_w, pad, ho,
                wo):  # pragma: no cover - compiled
    """One thread. Flat (1-d) arrays throughout (2-d indexing creates views in the inner
    loops). src: n_img images of src_img floats, planes of src_plane; row o of the weight:
    chan/off/val[indptr[o]:indptr[o + 1]] (source plane, offset in it). out: images of n_out
    planes (ho + 2 pad) x out_w; res (res_plane < 0: none): images of res_img, planes of
    res_plane, rows of res_w, read at (y + res_pad, x + res_pad). Outputs below lo are clipped
    to lo (0: ReLU, -FLT_MAX: none; fastmath assumes no infinities).

    Measured alternatives that ran slower here: this loop nest inside numba's parallel
    lowering (prange; ~2x per thread: it vectorizes worse), the sizes packed into one array
    (2x), a slice assignment to zero the accumulator (a parfor), blocks of output rows sized
    for L1 with every channel per block, a channel-major layout with several images per
    pass, and accumulating straight into the output plane (the first pass writing bias +
    residual, the last clipping; 4-30% slower). No faster: 64-byte-aligned offsets and
    planes, eight nonzeros per pass. The loop reaches ~27 G multiply-adds/s per core here with
    all of it in L1, the first ResNet-20 stage's layers 15-19: the limit was not pinned down."""
    out_plane = (ho + 2 * pad) * out_w
    acc = _aligned(length)
    n_acc = uint64(length)
    n_rows, n_cols, aw = uint64(ho), uint64(wo), uint64(width)
    uw, rw = uint64(out_w), uint64(res_w)
    for n in range(n_img):
        img = n * src_img
        for o in range(n_out):
            j = indptr[o]
            end = indptr[o + 1]
            first = True
            # four nonzeros per pass over acc: 5 loads and 1 store for 4 multiply-adds; the
            # last pass fills up with weight 0 (cheaper than a pass per leftover nonzero), and
            # the first writes (no pass to zero acc; an empty row writes zeros)
            while first or j < end:
                # unsigned indices: no wraparound check, so the loop vectorizes
                b0 = b1 = b2 = b3 = uint64(img)
                w0 = w1 = w2 = w3 = np.float32(0)
                if j < end:
                    b0, w0 = uint64(img + chan[j] * src_plane + off[j]), val[j]
                if j + 1 < end:
                    b1, w1 = uint64(img + chan[j + 1] * src_plane + off[j + 1]), val[j + 1]
                if j + 2 < end:
                    b2, w2 = uint64(img + chan[j + 2] * src_plane + off[j + 2]), val[j + 2]
                if j + 3 < end:
                    b3, w3 = uint64(img + chan[j + 3] * src_plane + off[j + 3]), val[j + 3]
                if first:
                    for q in range(n_acc):
                        acc[q] = (w0 * src[b0 + q] + w1 * src[b1 + q] + w2 * src[b2 + q]
                                  + w3 * src[b3 + q])
                else:
                    for q in range(n_acc):
                        acc[q] += (w0 * src[b0 + q] + w1 * src[b1 + q] + w2 * src[b2 + q]
                                   + w3 * src[b3 + q])
                first = False
                j += 4
            # epilogue (unsigned indices again): bias, residual, ReLU
            bo = bias[o]
            dst = uint64((n * n_out + o) * out_plane + pad * out_w + pad)
            if res_plane >= 0:
                r = uint64(n * res_img + o * res_plane + res_pad * res_w + res_pad)
                for y in range(n_rows):
                    for x in range(n_cols):
                        out[dst + y * uw + x] = max(acc[y * aw + x] + bo + res[r + y * rw + x],
                                                    lo)
            else:
                for y in range(n_rows):
                    for x in range(n_cols):
                        out[dst + y * uw + x] = max(acc[y * aw + x] + bo, lo)


@njit(parallel=True, **_FLAGS)
def sparse_conv_parallel(src, out, res, indptr, chan, off, val, bias, lo, src_img, src_plane,
                         width, length, res_img, res_plane, res_w, res_pad, n_img, n_out,
                         out_w, pad, ho, wo, blocks):  # pragma: no cover - compiled
    """`sparse_conv` over the threads: one task per (image, block of `blocks` output
    channels), each calling the single-threaded kernel on its part."""
    out_plane = (ho + 2 * pad) * out_w
    n_blk = (n_out + blocks - 1) // blocks
    for t in prange(n_img * n_blk):
        n = t // n_blk
        o0 = (t - n * n_blk) * blocks
        o1 = min(n_out, o0 + blocks)
        r0 = n * res_img + o0 * res_plane if res_plane >= 0 else 0
        sparse_conv(src[n * src_img:], out[(n * n_out + o0) * out_plane:], res[r0:],
                    indptr[o0:o1 + 1], chan, off, val, bias[o0:o1], lo, src_img, src_plane,
                    width, length, res_img, res_plane, res_w, res_pad, 1, o1 - o0, out_w, pad,
                    ho, wo)


@njit(parallel=True, **_FLAGS)
def phases(x, which, hq, wq):  # pragma: no cover - compiled
    """Stride-2 phases of x (N, C, H, W): (N, len(which) C, hq * wq); phase k = (a, b) =
    divmod(which[k], 2) holds x[:, :, a::2, b::2] (zero beyond)."""
    n_img, c_in, h, w = x.shape
    n_ph = len(which)
    flat = x.reshape(-1)
    out = np.zeros(n_img * n_ph * c_in * hq * wq, np.float32)
    uw, uq = uint64(w), uint64(wq)
    for t in prange(n_img * c_in):
        n = t // c_in
        c = t - n * c_in
        src = uint64(t * h * w)
        for k in range(n_ph):
            a = which[k] // 2
            b = which[k] - 2 * a
            dst = uint64(((n * n_ph + k) * c_in + c) * hq * wq)
            rows, cols = uint64((h - a + 1) // 2), uint64((w - b + 1) // 2)
            for i in range(rows):
                row = src + (uint64(a) + uint64(2) * i) * uw + uint64(b)
                for j in range(cols):
                    out[dst + i * uq + j] = flat[row + uint64(2) * j]
    return out.reshape(n_img, n_ph * c_in, hq * wq)


LANES = 16  # images per pixel vector in the blocked layout (one 64-byte AVX-512 register)


def _strip(nv, step, residual):
    """An inlined LLVM loop: for k < nv, the sum over j0 <= j < j1 of
    val[j] * src[s0 + base[j] + 16 step k : + 16] (pixels `step` apart: the stride), in nv
    vector registers; then out[d + 16 k : + 16] = max(sum + bias (+ res[r + 16 k : + 16] when
    `residual`), lo). numba's own loops keep such sums in memory."""
    vec = ir.VectorType(ir.FloatType(), LANES)
    i64 = ir.IntType(64)

    @intrinsic
    def strip(typingctx, src, s0, base, val, j0, j1, out, d, res, r, bias, lo):
        sig = types.void(src, types.uint64, base, val, types.int64, types.int64, out,
                         types.uint64, res, types.uint64, types.float32, types.float32)

        def codegen(context, builder, signature, args):
            def data(k):
                ty = signature.args[k]
                return context.make_array(ty)(context, builder, args[k]).data

            def at(ptr, offset, k):  # the k-th vector from ptr + offset
                return builder.bitcast(builder.gep(builder.gep(ptr, [offset]),
                                                   [ir.Constant(i64, k)]), vec.as_pointer())

            def splat(x):
                v = builder.insert_element(ir.Constant(vec, ir.Undefined), x,
                                           ir.Constant(ir.IntType(32), 0))
                return builder.shuffle_vector(v, ir.Constant(vec, ir.Undefined), ir.Constant(
                    ir.VectorType(ir.IntType(32), LANES), [0] * LANES))

            srcp, basep, valp, outp, resp = data(0), data(2), data(3), data(6), data(8)
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec] * 3), "llvm.fma.v16f32")
            entry = builder.block
            head = builder.append_basic_block("strip.head")
            body = builder.append_basic_block("strip.body")
            done = builder.append_basic_block("strip.done")
            builder.branch(head)
            builder.position_at_end(head)
            j = builder.phi(i64)
            sums = [builder.phi(vec) for _ in range(nv)]
            j.add_incoming(args[4], entry)
            for v in sums:
                v.add_incoming(ir.Constant(vec, [0.0] * LANES), entry)
            builder.cbranch(builder.icmp_signed("<", j, args[5]), body, done)
            builder.position_at_end(body)
            w = splat(builder.load(builder.gep(valp, [j])))
            src = builder.add(args[1], builder.load(builder.gep(basep, [j])))
            new = [builder.call(fma, [w, builder.load(at(srcp, src, LANES * step * k), align=4),
                                      v]) for k, v in enumerate(sums)]
            j.add_incoming(builder.add(j, ir.Constant(i64, 1)), body)
            builder.branch(head)
            for v, x in zip(sums, new):
                v.add_incoming(x, body)
            builder.position_at_end(done)
            bias, lo = splat(args[10]), splat(args[11])
            for k, v in enumerate(sums):
                v = builder.fadd(v, bias)
                if residual:
                    v = builder.fadd(v, builder.load(at(resp, args[9], LANES * k), align=4))
                v = builder.select(builder.fcmp_ordered(">", v, lo), v, lo)
                builder.store(v, at(outp, args[7], LANES * k), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return strip


def _pixels(nv, step):
    """The blocked kernel on pixels x0..x1 (a multiple of nv apart) of output row y of group
    g, nv at a time, stride `stride` (nv and, when nv > 1, stride = step are compile-time
    constants)."""
    plain, added = _strip(nv, step, False), _strip(nv, step, True)

    @njit(**_FLAGS)
    def pixels(src, out, res, indptr, base, val, bias, lo, src_img, width, res_img, res_plane,
               res_w, res_pad, n_out, out_w, pad, ho, g, y, x0, x1,
               stride):  # pragma: no cover - compiled
        out_plane = (ho + 2 * pad) * out_w
        low = np.float32(lo)
        for x in range(x0, x1, nv):
            p = uint64(LANES * (g * src_img + (y * width + x) * stride))
            for o in range(n_out):
                d = uint64(LANES * ((g * n_out + o) * out_plane + (y + pad) * out_w + x + pad))
                if res_plane >= 0:
                    r = uint64(LANES * (g * res_img + o * res_plane + (y + res_pad) * res_w + x
                                        + res_pad))
                    added(src, p, base, val, indptr[o], indptr[o + 1], out, d, res, r, bias[o],
                          low)
                else:
                    plain(src, p, base, val, indptr[o], indptr[o + 1], out, d, res, uint64(0),
                          bias[o], low)
    return pixels


_pixels4, _pixels4s2, _pixels1 = _pixels(4, 1), _pixels(4, 2), _pixels(1, 1)


@njit(**_FLAGS)
def _blocked_rows(src, out, res, indptr, base, val, bias, lo, src_img, width, res_img,
                  res_plane, res_w, res_pad, n_out, out_w, pad, ho, wo, stride, t0,
                  t1):  # pragma: no cover - compiled
    """Output rows t0..t1 (row t: group t // ho, row t % ho) of the blocked kernel: four
    pixels at a time, then one. Sizes in pixels (each LANES floats); base[j]: nonzero j's
    source plane and offset, in floats; stride 1 or 2 (read straight from the input, no
    sub-sampled copies: every load is still one aligned pixel)."""
    w4 = wo - wo % 4
    for t in range(t0, t1):
        g = t // ho
        y = t - g * ho
        if stride == 1:
            _pixels4(src, out, res, indptr, base, val, bias, lo, src_img, width, res_img,
                     res_plane, res_w, res_pad, n_out, out_w, pad, ho, g, y, 0, w4, 1)
        else:
            _pixels4s2(src, out, res, indptr, base, val, bias, lo, src_img, width, res_img,
                       res_plane, res_w, res_pad, n_out, out_w, pad, ho, g, y, 0, w4, 2)
        _pixels1(src, out, res, indptr, base, val, bias, lo, src_img, width, res_img, res_plane,
                 res_w, res_pad, n_out, out_w, pad, ho, g, y, w4, wo, stride)


@njit(**_FLAGS)
def sparse_conv_blocked(src, out, res, indptr, base, val, bias, lo, src_img, width, res_img,
                        res_plane, res_w, res_pad, n_grp, n_out, out_w, pad, ho, wo,
                        stride):  # pragma: no cover - compiled
    """The blocked layout's kernel, one thread (arguments as `sparse_conv`'s, in pixels)."""
    _blocked_rows(src, out, res, indptr, base, val, bias, lo, src_img, width, res_img,
                  res_plane, res_w, res_pad, n_out, out_w, pad, ho, wo, stride, 0, n_grp * ho)


@njit(parallel=True, **_FLAGS)
def sparse_conv_blocked_parallel(src, out, res, indptr, base, val, bias, lo, src_img, width,
                                 res_img, res_plane, res_w, res_pad, n_grp, n_out, out_w, pad,
                                 ho, wo, stride, blocks):  # pragma: no cover - compiled
    """`sparse_conv_blocked` over the threads, `blocks` output rows per task."""
    rows = n_grp * ho
    for t in prange((rows + blocks - 1) // blocks):
        _blocked_rows(src, out, res, indptr, base, val, bias, lo, src_img, width, res_img,
                      res_plane, res_w, res_pad, n_out, out_w, pad, ho, wo, stride,
                      t * blocks, min(rows, (t + 1) * blocks))


@njit(**_FLAGS)
def sparse_linear(indptr, col, val, bias, xt, out, n, o0, o1):  # pragma: no cover - compiled
    """Rows o0..o1 of out = W xᵀ + bias (one thread): W's CSR arrays, xt the input
    transposed (in_features rows of n, flat), out (out_features rows of n, flat). Each
    nonzero is one multiply-add over a whole row of n (the batch), four per pass."""
    un = uint64(n)
    for o in range(o0, o1):
        dst = uint64(o * n)
        b = bias[o]
        for q in range(un):
            out[dst + q] = b
        j = indptr[o]
        end = indptr[o + 1]
        while j + 4 <= end:
            s0, s1 = uint64(col[j] * n), uint64(col[j + 1] * n)
            s2, s3 = uint64(col[j + 2] * n), uint64(col[j + 3] * n)
            w0, w1, w2, w3 = val[j], val[j + 1], val[j + 2], val[j + 3]
            for q in range(un):
                out[dst + q] += (w0 * xt[s0 + q] + w1 * xt[s1 + q] + w2 * xt[s2 + q]
                                 + w3 * xt[s3 + q])
            j += 4
        while j < end:
            s0 = uint64(col[j] * n)
            w0 = val[j]
            for q in range(un):
                out[dst + q] += w0 * xt[s0 + q]
            j += 1


@njit(parallel=True, **_FLAGS)
def sparse_linear_parallel(indptr, col, val, bias, xt, out, n, o0, o1,
                           blocks):  # pragma: no cover - compiled
    """`sparse_linear` over the threads, `blocks` output rows per task."""
    n_blk = (o1 - o0 + blocks - 1) // blocks
    for t in prange(n_blk):
        a = o0 + t * blocks
        sparse_linear(indptr, col, val, bias, xt, out, n, a, min(o1, a + blocks))
