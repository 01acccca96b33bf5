"""The rest of the CAM family: Grad-CAM++, XGrad-CAM, LayerCAM, HiResCAM and Eigen-CAM.

Definitions as pytorch-grad-cam implements them (the reference users compare with), on one
layer's activations ``A`` (``B x K x h x w``) and, for the gradient methods, ``g = dS/dA`` with
``S`` the raw target logit. Every map is ``ReLU(M)``, min-max normalised by
:class:`explainers.cam.ActivationCAM` (pytorch-grad-cam also applies the ReLU to every
method's map). Arithmetic in float32, like the reference; its epsilons are kept exactly.

- Grad-CAM++ and XGrad-CAM are channel-weighted, ``M = sum_k w_k A_k``: they define
  :meth:`channel_weights`.
- LayerCAM and HiResCAM weight every position of every channel, Eigen-CAM projects the
  activations on their first principal component: they define :meth:`cam_map`.
"""

from __future__ import annotations

import torch

from explainers.cam import ActivationCAM


def _spatial_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``sum_ij`` per image and channel, kept as ``B x K x 1 x 1``."""
    return tensor.sum(dim=(2, 3), keepdim=True)


class GradCAMPlusPlus(ActivationCAM):
    """Grad-CAM++ (Chattopadhyay et al., WACV 2018, arXiv 1710.11063, eq. 19 with the ReLU of eq. 7).

    ``alpha_kij = g^2 / (2 g^2 + (sum_ab A_kab) g^3 + eps)`` with ``eps = 1e-6``, and
    ``alpha = 0`` where ``g = 0``; ``w_k = sum_ij alpha_kij ReLU(g_kij)``;
    map = ``ReLU(sum_k w_k A_k)``. (The higher derivatives of ``exp(S)`` reduce to powers of
    ``g`` for a piecewise-linear head, as in the paper.)
    """

    name = "gradcam++"
    needs_gradient = True
    description = ("Grad-CAM++ heat map: gradient weights that credit every instance of the class "
                   "(a fraction of a second on a CPU)")

    def channel_weights(self, session, inputs, activations, logits, targets, gradients):
        assert gradients is not None
        g = gradients.float()
        g2 = g * g
        g3 = g2 * g
        sums = _spatial_sum(activations.detach().float())
        alpha = g2 / (2 * g2 + sums * g3 + 1e-6)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        return (alpha * g.clamp_min(0)).sum(dim=(2, 3))


class XGradCAM(ActivationCAM):
    """XGrad-CAM (Fu et al., BMVC 2020, arXiv 2008.02312): axiom-based gradient weights.

    ``w_k = sum_ij (A_kij / (sum_ab A_kab + eps)) g_kij`` with ``eps = 1e-7``;
    map = ``ReLU(sum_k w_k A_k)``.
    """

    name = "xgradcam"
    needs_gradient = True
    description = ("XGrad-CAM heat map: gradients weighted by each channel's normalised activations "
                   "(a fraction of a second on a CPU)")

    def channel_weights(self, session, inputs, activations, logits, targets, gradients):
        assert gradients is not None
        a = activations.detach().float()
        return (gradients.float() * a / (_spatial_sum(a) + 1e-7)).sum(dim=(2, 3))


class LayerCAM(ActivationCAM):
    """LayerCAM (Jiang et al., IEEE TIP 2021, doi 10.1109/TIP.2021.3089943).

    Element-wise, no channel pooling: map = ``ReLU(sum_k ReLU(g_kij) A_kij)``. Its positive
    gradients keep fine detail, so it is also useful at shallower layers than Grad-CAM.
    """

    name = "layercam"
    needs_gradient = True
    description = ("LayerCAM heat map: activations weighted position by position by their positive gradients "
                   "(a fraction of a second on a CPU)")

    def cam_map(self, session, inputs, activations, logits, targets, gradients):
        assert gradients is not None
        return (gradients.float().clamp_min(0) * activations.detach().float()).sum(dim=1)


class HiResCAM(ActivationCAM):
    """HiResCAM (Draelos & Carin, 2020, arXiv 2011.08891).

    Element-wise: map = ``ReLU(sum_k g_kij A_kij)``. Unlike Grad-CAM's spatially pooled
    weights, it provably shows the locations the score used (for a head that is a linear
    function of the layer, ``sum_ij`` of the map before the ReLU is the target logit minus the bias).
    """

    name = "hirescam"
    needs_gradient = True
    description = ("HiResCAM heat map: the element-wise product of gradients and activations "
                   "(a fraction of a second on a CPU)")

    def cam_map(self, session, inputs, activations, logits, targets, gradients):
        assert gradients is not None
        return (gradients.float() * activations.detach().float()).sum(dim=1)


def _first_component_projection(x: torch.Tensor) -> torch.Tensor:
    """``X v_1`` per matrix of the batch ``X`` (``B x n x K``), ``v_1`` its first right singular
    vector, from the symmetric eigenproblem of the smaller Gram matrix: ``X^T X v_1 = s_1^2 v_1``,
    or ``X X^T u_1 = s_1^2 u_1`` with ``X v_1 = s_1 u_1``. The same vector as an SVD's (up to
    sign), at a fraction of a multi-threaded SVD's erratic cost on small matrices."""
    if x.shape[2] <= x.shape[1]:
        _, vectors = torch.linalg.eigh(x.transpose(1, 2) @ x)
        return (x @ vectors[..., -1:])[..., 0]
    values, vectors = torch.linalg.eigh(x @ x.transpose(1, 2))
    return vectors[..., -1] * values[..., -1:].clamp_min(0).sqrt()


class EigenCAM(ActivationCAM):
    """Eigen-CAM (Muhammad & Yeasin, IJCNN 2020, arXiv 2008.00299): class-agnostic, no gradient.

    Per image: reshape ``A`` to the ``(h*w) x K`` matrix ``X``, centre its columns
    (``X - mean over positions``), take the first right singular vector ``v_1`` of
    ``X = U S V^T`` and project: ``M = X v_1`` (reshaped to ``h x w``); map = ``ReLU(M)``.
    NaN activations are read as zero, as in the reference.

    The sign of a singular vector is arbitrary (``-u_1, -v_1`` is as valid), and
    pytorch-grad-cam's ``EigenCAM`` keeps whatever sign its SVD returns. Here the sign is fixed
    deterministically by the rule of pytorch-grad-cam's ``get_2d_projection_with_sign_correction``
    (Seg-Eigen-CAM, Chung & Ying 2025, eq. 13): ``M`` is negated when ``|min M| > |max M|``, so
    the projection's dominant lobe is the positive one that survives the ReLU.

    The component is computed in float64 (a ``(h*w) x K`` matrix per image; cheap next to the
    forward), so it is stable when the leading singular values are close. The map does not
    depend on the target class; the target is still resolved and reported.
    """

    name = "eigencam"
    description = ("Eigen-CAM heat map: the first principal component of the layer's activations; "
                   "class-agnostic (the same map for every target) and gradient-free")

    def cam_map(self, session, inputs, activations, logits, targets, gradients):
        a = activations.detach().double()
        a = torch.where(torch.isnan(a), torch.zeros_like(a), a)
        batch, channels, height, width = a.shape
        x = a.flatten(2).transpose(1, 2)  # B x (h*w) x K
        x = x - x.mean(dim=1, keepdim=True)
        projection = _first_component_projection(x)  # B x (h*w)
        flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
        projection = torch.where(flip[:, None], -projection, projection)
        return projection.reshape(batch, height, width).float()


__all__ = ["EigenCAM", "GradCAMPlusPlus", "HiResCAM", "LayerCAM", "XGradCAM"]
