"""The notes' matrices, built explicitly for small sizes: to see them, and to check the fast rules against them.

Lin's layout (Gradient Calculation, eq. 3-28). One image is a matrix Z of d x (a b): a row per channel, a column
per pixel, pixels in column-major order (MATLAB's): pixel (r, c) of an a x b image is column r + a c. ``vec``
stacks the columns of a matrix (column-major), so

    vec(Z)[ch + d (r + a c)] = Z[ch, r + a c] = x[r, c, ch]        (x: our H x W x C array of the image)

A patch of h_r x h_c pixels and d channels is vectorised the same way (channel fastest, then the row, then the
column in the patch): row ch + d (i + h_r j) of phi(pad(Z)) holds kernel tap (i, j) of channel ch, and column q
of phi(pad(Z)) and of S is output pixel q (column-major). Hence the notes' weight matrix

    W[o, ch + d (i + h_r j)] = w[i, j, ch, o]        (w: our HWIO kernel)

which is ``w.reshape(-1, C_out).T`` with its columns permuted from our (i, j, ch) row-major order to (ch, i, j)
column-major (``weight_matrix`` builds it; tests/test_matrices.py checks it).

DD2424's layout (lecture 7): one plane at a time, ``vec`` row-major (X.flatten()), filters F applied as a
correlation S_lm = sum_ij X_{l+i-1, m+j-1} F_ij; vec(S) = M_X vec(F) = M_F^filter vec(X); several planes stack
side by side: M_X = (M_X1 ... M_Xd), M_F = (M_F1 ... M_Fd).

All functions return float64 NumPy arrays and refuse sizes whose matrices would exceed ``MAX_ENTRIES``.
"""

from __future__ import annotations

import numpy as np

from jaxcnn.ops import _args
from jaxcnn.ops._windows import output_size

MAX_ENTRIES = 20_000_000


def vec(a: np.ndarray) -> np.ndarray:
    """The notes' vec: the columns of a matrix stacked (column-major)."""
    return np.asarray(a, np.float64).reshape(-1, order="F")


def mat(v: np.ndarray, rows: int) -> np.ndarray:
    """Inverse of ``vec``: a matrix with ``rows`` rows."""
    return np.asarray(v, np.float64).reshape(rows, -1, order="F")


def image_to_lin(x: np.ndarray) -> np.ndarray:
    """An image [H, W, C] (ours) as Lin's Z: C x (H W), pixels column-major."""
    x = np.asarray(x, np.float64)
    return x.transpose(2, 1, 0).reshape(x.shape[2], -1)


def lin_to_image(z: np.ndarray, height: int) -> np.ndarray:
    """Inverse of ``image_to_lin``."""
    z = np.asarray(z, np.float64)
    return z.reshape(z.shape[0], -1, height).transpose(2, 1, 0)


def weight_matrix(w: np.ndarray) -> np.ndarray:
    """Lin's W^m (C_out x h_r h_c C_in) from our HWIO kernel: W[o, ch + d (i + h_r j)] = w[i, j, ch, o]."""
    w = np.asarray(w, np.float64)
    return w.transpose(3, 1, 0, 2).reshape(w.shape[3], -1)


def _check_size(rows: int, cols: int, what: str) -> None:
    if rows * cols > MAX_ENTRIES:
        raise ValueError(f"{what} would be {rows} x {cols}; these matrices are for small examples "
                         f"(at most {MAX_ENTRIES:,} entries)")


def _pixel(r: int, c: int, height: int) -> int:
    return r + height * c


def p_pad(d: int, a: int, b: int, padding) -> np.ndarray:
    """P_pad: vec(pad(Z)) = P_pad vec(Z) for Z of d channels on an a x b image; ``padding`` an int, (ph, pw) or
    ((top, bottom), (left, right))."""
    if isinstance(padding, str):
        raise ValueError("p_pad: give explicit padding amounts ('SAME' depends on the kernel: see phi_pad)")
    (top, bottom), (left, right) = _args.padding("p_pad", padding, (a, b), (1, 1), (1, 1))
    ap, bp = a + top + bottom, b + left + right
    _check_size(d * ap * bp, d * a * b, "P_pad")
    P = np.zeros((d * ap * bp, d * a * b))
    for r in range(a):
        for c in range(b):
            for ch in range(d):
                P[ch + d * _pixel(r + top, c + left, ap), ch + d * _pixel(r, c, a)] = 1
    return P


def p_phi(d: int, a_pad: int, b_pad: int, kernel, stride=1, dilation=1) -> np.ndarray:
    """P_phi: vec(phi(pad(Z))) = P_phi vec(pad(Z)) for a padded image of d x (a_pad b_pad)."""
    (hr, hc) = _args.positive_pair("p_phi", "kernel", kernel)
    (sr, sc) = _args.positive_pair("p_phi", "stride", stride)
    (dr, dc) = _args.positive_pair("p_phi", "dilation", dilation)
    ar, bc = output_size(a_pad, hr, sr, (0, 0), dr), output_size(b_pad, hc, sc, (0, 0), dc)
    rows_per_patch = d * hr * hc
    _check_size(rows_per_patch * ar * bc, d * a_pad * b_pad, "P_phi")
    P = np.zeros((rows_per_patch * ar * bc, d * a_pad * b_pad))
    for qr in range(ar):
        for qc in range(bc):
            q = _pixel(qr, qc, ar)
            for i in range(hr):
                for j in range(hc):
                    for ch in range(d):
                        row = q * rows_per_patch + ch + d * (i + hr * j)
                        P[row, ch + d * _pixel(qr * sr + i * dr, qc * sc + j * dc, a_pad)] = 1
    return P


def conv_p(d: int, a: int, b: int, kernel, stride=1, padding=0, dilation=1) -> tuple[np.ndarray, np.ndarray]:
    """(P_phi, P_pad) of a convolution on d channels of an a x b image; ``padding`` as in conv2d ("SAME" too)."""
    hr, hc = _args.positive_pair("conv_p", "kernel", kernel)
    dr, dc = _args.positive_pair("conv_p", "dilation", dilation)
    extent = (dr * (hr - 1) + 1, dc * (hc - 1) + 1)
    pads = _args.padding("conv_p", padding, (a, b), extent, _args.positive_pair("conv_p", "stride", stride))
    return p_phi(d, a + sum(pads[0]), b + sum(pads[1]), kernel, stride, dilation), p_pad(d, a, b, pads)


def phi_pad(z: np.ndarray, a: int, b: int, kernel, stride=1, padding=0, dilation=1) -> np.ndarray:
    """phi(pad(Z)) = mat(P_phi P_pad vec(Z)), of size (h_r h_c d) x (a_conv b_conv) (Lin eq. 3)."""
    P_phi, P_pad = conv_p(z.shape[0], a, b, kernel, stride, padding, dilation)
    hr, hc = _args.positive_pair("phi_pad", "kernel", kernel)
    return mat(P_phi @ P_pad @ vec(z), z.shape[0] * hr * hc)


def p_pool(sigma_s: np.ndarray, a: int, b: int, window, stride=None) -> np.ndarray:
    """P_pool (Lin eq. 3, 16): vec(Z^{m+1}) = P_pool vec(sigma(S)), with the 1 of each output at the first
    maximum of its window (row-major over the window, as jc.max_pool2d). Built from a forward pass: it depends on
    ``sigma_s`` (d x a b, Lin's layout)."""
    d = sigma_s.shape[0]
    kr, kc = _args.positive_pair("p_pool", "window", window)
    sr, sc = (kr, kc) if stride is None else _args.positive_pair("p_pool", "stride", stride)
    ar, bc = output_size(a, kr, sr), output_size(b, kc, sc)
    _check_size(d * ar * bc, d * a * b, "P_pool")
    P = np.zeros((d * ar * bc, d * a * b))
    for qr in range(ar):
        for qc in range(bc):
            for ch in range(d):
                taps = [(qr * sr + i, qc * sc + j) for i in range(kr) for j in range(kc)]
                values = [sigma_s[ch, _pixel(r, c, a)] for r, c in taps]
                r, c = taps[int(np.argmax(values))]
                P[ch + d * _pixel(qr, qc, ar), ch + d * _pixel(r, c, a)] = 1
    return P


def m_x(x_planes: np.ndarray, f: int | tuple[int, int]) -> np.ndarray:
    """DD2424's M_X: vec(S) = M_X vec(F) for planes X [d, h, w] and filters F [d, f, f] (row-major vecs)."""
    x_planes = np.asarray(x_planes, np.float64)
    fr, fc = _args.positive_pair("m_x", "f", f)
    d, h, w = x_planes.shape
    rows = (h - fr + 1) * (w - fc + 1)
    _check_size(rows, d * fr * fc, "M_X")
    blocks = []
    for plane in x_planes:
        block = np.array([plane[l:l + fr, m:m + fc].reshape(-1) for l in range(h - fr + 1) for m in range(w - fc + 1)])
        blocks.append(block)
    return np.concatenate(blocks, axis=1)


def m_f(f_planes: np.ndarray, h: int, w: int) -> np.ndarray:
    """DD2424's M_F^filter: vec(S) = M_F vec(X) for filters F [d, f, f] on planes X [d, h, w] (row-major)."""
    f_planes = np.asarray(f_planes, np.float64)
    d, fr, fc = f_planes.shape
    out_h, out_w = h - fr + 1, w - fc + 1
    _check_size(out_h * out_w, d * h * w, "M_F")
    M = np.zeros((out_h * out_w, d * h * w))
    for k, plane in enumerate(f_planes):
        for l in range(out_h):
            for m in range(out_w):
                for i in range(fr):
                    for j in range(fc):
                        M[l * out_w + m, k * h * w + (l + i) * w + (m + j)] = plane[i, j]
    return M


def a_maxpool(plane: np.ndarray, r: int, s: int | None = None) -> np.ndarray:
    """DD2424's A_MaxPool: vec(H~) = A vec(H) for one plane, row-major vecs, first maximum of a tied window."""
    plane = np.asarray(plane, np.float64)
    s = r if s is None else s
    h, w = plane.shape
    out_h, out_w = output_size(h, r, s), output_size(w, r, s)
    A = np.zeros((out_h * out_w, h * w))
    for i in range(out_h):
        for j in range(out_w):
            window = plane[i * s:i * s + r, j * s:j * s + r]
            k = int(np.argmax(window))
            A[i * out_w + j, (i * s + k // r) * w + (j * s + k % r)] = 1
    return A
