"""The notes' explicit matrices: their identities, and that the fast hand rules compute exactly them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn as jc
from jaxcnn import matrices as M  # noqa: N812  (M for matrices, as the notes write them)

rng = np.random.default_rng(0)


def test_kronecker_identities_6_to_9():
    A, B = rng.normal(size=(3, 4)), rng.normal(size=(4, 5))
    I3, I5 = np.eye(3), np.eye(5)
    np.testing.assert_allclose(M.vec(A @ B), np.kron(I5, A) @ M.vec(B), rtol=1e-12)  # (6)
    np.testing.assert_allclose(M.vec(A @ B), np.kron(B.T, I3) @ M.vec(A), rtol=1e-12)  # (7)
    np.testing.assert_allclose(M.vec(A @ B), M.vec(B) @ np.kron(I5, A.T), rtol=1e-12)  # (8), as row vectors
    np.testing.assert_allclose(M.vec(A @ B), M.vec(A) @ np.kron(B, I3), rtol=1e-12)  # (9)
    np.testing.assert_array_equal(M.mat(M.vec(A), 3), A)


def test_layout_permutations():
    x = rng.normal(size=(4, 3, 2))  # H, W, C
    Z = M.image_to_lin(x)
    assert Z.shape == (2, 12)
    assert Z[1, 2 + 4 * 1] == x[2, 1, 1]  # pixel (r=2, c=1) is column r + a c
    np.testing.assert_array_equal(M.lin_to_image(Z, 4), x)
    w = rng.normal(size=(3, 2, 4, 5))  # HWIO
    W = M.weight_matrix(w)
    assert W.shape == (5, 24) and W[3, 1 + 4 * (2 + 3 * 1)] == w[2, 1, 1, 3]  # W[o, ch + d (i + h_r j)]
    ours = w.reshape(-1, 5).T  # rows (i, j, ch) row-major: the same entries, columns permuted
    assert sorted(W.ravel()) == sorted(ours.ravel()) and not np.array_equal(W, ours)


CASES = [
    dict(kernel=(3, 3), stride=1, padding=1, dilation=1),
    dict(kernel=(2, 3), stride=(2, 1), padding=((1, 0), (2, 1)), dilation=(1, 2)),
    dict(kernel=(3, 2), stride=2, padding="SAME", dilation=1),
]


def conv_setup(case, n=2, a=6, b=5, d=2, d_out=3):
    x = rng.normal(size=(n, a, b, d))
    w = rng.normal(size=(*case["kernel"], d, d_out))
    bias = rng.normal(size=(d_out,))
    return x, w, bias, dict(case)


@pytest.mark.parametrize("store_phi", [True, False], ids=["phi @ w2", "lax conv"])
@pytest.mark.parametrize("case", CASES)
def test_s_equals_w_phi_pad_z_plus_b_and_eq_4_5(case, store_phi):
    x, w, bias, kw = conv_setup(case)
    conv_kw = {k: kw[k] for k in ("stride", "padding", "dilation")}
    s = np.asarray(jc.conv2d(jnp.asarray(x), jnp.asarray(w), jnp.asarray(bias), **conv_kw, store_phi=store_phi))
    W = M.weight_matrix(w)
    for i in range(len(x)):
        phi = M.phi_pad(M.image_to_lin(x[i]), *x.shape[1:3], **kw)
        S = W @ phi + bias[:, None]  # Lin eq. (3)
        np.testing.assert_allclose(S, M.image_to_lin(s[i]), rtol=1e-12, atol=1e-12)
        ab = phi.shape[1]
        ones = np.ones((ab, 1))
        np.testing.assert_allclose(M.vec(S), np.kron(np.eye(ab), W) @ M.vec(phi)
                                   + np.kron(ones, np.eye(len(bias))) @ bias, rtol=1e-12, atol=1e-12)  # (4)
        np.testing.assert_allclose(M.vec(S), np.kron(phi.T, np.eye(len(bias))) @ M.vec(W)
                                   + np.kron(ones, np.eye(len(bias))) @ bias, rtol=1e-12, atol=1e-12)  # (5)


@pytest.mark.parametrize("rule", ["im2col", "flip"])
@pytest.mark.parametrize("case", CASES)
def test_gradient_formulas_12_14_18_equal_the_fast_rules(case, rule):
    x, w, bias, kw = conv_setup(case, n=1)
    a, b = x.shape[1:3]
    conv_kw = {k: kw[k] for k in ("stride", "padding", "dilation")}
    out, pullback = jax.vjp(lambda x, w, b: jc.conv2d(x, w, b, **conv_kw, rule=rule), *map(jnp.asarray, (x, w, bias)))
    delta_img = rng.normal(size=out.shape)
    dx, dw, db = (np.asarray(g) for g in pullback(jnp.asarray(delta_img)))
    Delta = M.image_to_lin(delta_img[0])  # dxi/dS, d_out x (a_conv b_conv)
    Z = M.image_to_lin(x[0])
    phi = M.phi_pad(Z, a, b, **kw)
    np.testing.assert_allclose(Delta @ phi.T, M.weight_matrix(dw), rtol=1e-11, atol=1e-12)  # (12)
    np.testing.assert_allclose(Delta @ np.ones(phi.shape[1]), db, rtol=1e-11, atol=1e-12)  # (14)
    P_phi, P_pad = M.conv_p(x.shape[3], a, b, **kw)
    dZ = M.vec(M.weight_matrix(w).T @ Delta) @ P_phi @ P_pad  # (18)
    np.testing.assert_allclose(dZ, M.vec(M.image_to_lin(dx[0])), rtol=1e-11, atol=1e-12)


def test_eq_16_relu_and_pooling_backward():
    """dxi/dvec(S)^T = (dxi/dvec(Z^{m+1})^T P_pool) (.) vec(I[S])^T equals the chain relu -> max_pool."""
    s = rng.normal(size=(6, 4, 3))  # H, W, C: S of one image
    v_img = rng.normal(size=(3, 2, 3))
    _, pullback = jax.vjp(lambda s: jc.max_pool2d(jc.relu(s[None]), 2)[0], jnp.asarray(s))
    (expected,) = pullback(jnp.asarray(v_img))
    S = M.image_to_lin(s)
    P = M.p_pool(np.maximum(S, 0), 6, 4, 2)
    got = (M.vec(M.image_to_lin(v_img)) @ P) * M.vec(S > 0)  # (16)
    np.testing.assert_allclose(got, M.vec(M.image_to_lin(np.asarray(expected))), rtol=1e-12)
    np.testing.assert_array_equal(P @ M.vec(np.maximum(S, 0)),
                                  M.vec(M.image_to_lin(np.asarray(jc.max_pool2d(jc.relu(jnp.asarray(s)[None]), 2)[0]))))


def test_eq_23_equals_eq_24_on_lins_example_and_at_random():
    """Lin's image B (one channel) -> [[5, 9], [4, 6]]; v^T P_pool puts v1..v4 at vec positions 6, 8, 14, 15;
    (23) masks with I[S] after routing, (24) with I[Z^{m+1}] before: the same vector."""
    B = np.array([[3.0, 2, 3, 6], [4, 5, 4, 9], [2, 1, 2, 6], [3, 4, 3, 2]])
    for S in (B[None].reshape(1, 16, order="F"), rng.normal(size=(1, 16))):
        P = M.p_pool(np.maximum(S, 0), 4, 4, 2)
        Z_next = P @ M.vec(np.maximum(S, 0))
        v = rng.normal(size=4)
        eq23 = (v @ P) * M.vec(S > 0)
        eq24 = (v * (Z_next > 0)) @ P
        np.testing.assert_array_equal(eq23, eq24)
    P = M.p_pool(B.reshape(1, 16, order="F"), 4, 4, 2)
    np.testing.assert_array_equal(P @ M.vec(B.reshape(1, 16, order="F")), [5, 4, 9, 6])
    np.testing.assert_array_equal(np.nonzero(np.array([1.0, 2, 3, 4]) @ P)[0] + 1, [6, 8, 14, 15])


def test_fused_block_is_eq_24_then_27_28():
    """conv_relu_pool's hand rule equals eq. (24) -> (27), (28) written with the explicit matrices."""
    x, w, bias, _ = conv_setup(dict(kernel=(3, 3), stride=1, padding=1, dilation=1), n=1, a=4, b=4)
    out, pullback = jax.vjp(lambda x, w: jc.conv_relu_pool(x, w, jnp.asarray(bias), padding=1),
                            jnp.asarray(x), jnp.asarray(w))
    v_img = rng.normal(size=out.shape)
    dx, dw = (np.asarray(g) for g in pullback(jnp.asarray(v_img)))
    Z = M.image_to_lin(x[0])
    phi = M.phi_pad(Z, 4, 4, (3, 3), padding=1)
    S = M.weight_matrix(w) @ phi + bias[:, None]
    P = M.p_pool(np.maximum(S, 0), 4, 4, 2)
    Z_next = P @ M.vec(np.maximum(S, 0))
    Delta = M.mat((M.vec(M.image_to_lin(v_img[0])) * (Z_next > 0)) @ P, len(bias))  # (26)
    np.testing.assert_allclose(Delta @ phi.T, M.weight_matrix(dw), rtol=1e-11, atol=1e-12)  # (27)
    dZ = M.vec(M.weight_matrix(w).T @ Delta) @ M.p_phi(2, 6, 6, 3) @ M.p_pad(2, 4, 4, 1)  # (28)
    np.testing.assert_allclose(dZ, M.vec(M.image_to_lin(dx[0])), rtol=1e-11, atol=1e-12)


def test_dd2424_6x6_example_sizes_and_gradients():
    X, F = rng.normal(size=(1, 6, 6)), rng.normal(size=(1, 3, 3))
    MX, MF = M.m_x(X, 3), M.m_f(F, 6, 6)
    assert MX.shape == (16, 9) and MF.shape == (16, 36)
    X4, F4 = rng.normal(size=(4, 6, 6)), rng.normal(size=(4, 3, 3))
    MX4, MF4 = M.m_x(X4, 3), M.m_f(F4, 6, 6)
    assert MX4.shape == (16, 36) and MF4.shape == (16, 144)
    x, w = jnp.asarray(X4.transpose(1, 2, 0)[None]), jnp.asarray(F4.transpose(1, 2, 0)[..., None])
    s, pullback = jax.vjp(jc.conv2d, x, w)
    vec_s = np.asarray(s).reshape(-1)  # row-major, S11 S12 ... S44
    np.testing.assert_allclose(MX4 @ F4.reshape(-1), vec_s, rtol=1e-12)  # vec(S) = M_X vec(F)
    np.testing.assert_allclose(MF4 @ X4.reshape(-1), vec_s, rtol=1e-12)  # vec(S) = M_F vec(X)
    g = rng.normal(size=16)
    dx, dw = pullback(jnp.asarray(g.reshape(1, 4, 4, 1)))
    np.testing.assert_allclose(g @ MX4, np.asarray(dw)[..., 0].transpose(2, 0, 1).reshape(-1), rtol=1e-12)
    np.testing.assert_allclose(g @ MF4, np.asarray(dx)[0].transpose(2, 0, 1).reshape(-1), rtol=1e-12)


def test_dd2424_a_maxpool():
    H = np.array([[1.0, 1, 2, 4], [5, 6, 7, 8], [3, 2, 1, 0], [1, 2, 3, 4]])
    A = M.a_maxpool(H, 2)
    assert A.shape == (4, 16)
    np.testing.assert_array_equal(np.nonzero(A)[1] + 1, [6, 8, 9, 16])
    np.testing.assert_array_equal(A @ H.reshape(-1), [6, 8, 3, 4])


def test_size_guard():
    with pytest.raises(ValueError, match="these matrices are for small examples"):
        M.p_phi(64, 100, 100, 5)
    with pytest.raises(ValueError, match="give explicit padding amounts"):
        M.p_pad(1, 4, 4, "SAME")
