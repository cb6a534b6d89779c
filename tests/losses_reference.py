"""Slow, plain-NumPy reference for the CGL regularizers (float64 loops).

Written from the spec (method.md), one formula at a time, with explicit loops
over images, channels, groups and pairs. It shares no code with
``cgl_jax.losses`` on purpose: the tests compare the two on random inputs.
Only for tiny inputs.
"""
import itertools
import math

import numpy as np


def sigmoid(x):
  return 0.5 * (1.0 + np.tanh(0.5 * x))  # = 1 / (1 + exp(-x)), no overflow


def soft_masks(preact, *, scale=1.0, shift=0.0, eps=5e-3):
  """ψ = sigmoid(P1 · a / (S_c + eps) + P2), S_c = std over B, H, W (ddof 1)."""
  a = np.asarray(preact, np.float64)
  out = np.empty_like(a)
  for c in range(a.shape[-1]):
    values = a[..., c].ravel()
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    out[..., c] = sigmoid(scale * a[..., c] / (std + eps) + shift)
  return out


def soft_masks_bn(bn_out, gamma, *, scale=1.0, shift=0.0, eps=1e-3):
  """ψ = sigmoid(P1 · y / γ + P2) with |γ| raised to eps, keeping its sign."""
  y = np.asarray(bn_out, np.float64)
  out = np.empty_like(y)
  for c, g in enumerate(np.asarray(gamma, np.float64)):
    if abs(g) < eps:
      g = -eps if g < 0 else eps
    out[..., c] = sigmoid(scale * y[..., c] / g + shift)
  return out


def soft_jaccard(p, q):
  """D = 2‖p−q‖₁ / (‖p‖₁ + ‖q‖₁ + ‖p−q‖₁) over ALL entries (0 if all are 0)."""
  p = np.asarray(p, np.float64).ravel()
  q = np.asarray(q, np.float64).ravel()
  diff = sum(abs(a - b) for a, b in zip(p, q))
  denominator = sum(abs(a) for a in p) + sum(abs(b) for b in q) + diff
  return 0.0 if denominator == 0 else 2 * diff / denominator


def all_ordered_pairs(f):
  return [(i, j) for i, j in itertools.product(range(f), repeat=2) if i != j]


def group_coherence(psi, num_groups, *, pairs=None, reduction='per_sample'):
  """[G] mean D over `pairs` (list of (i, j); None = all ordered pairs i ≠ j).

  per_sample: D per image over H×W, mean over images then pairs.
  pooled: one D per pair over B×H×W, mean over pairs.
  """
  psi = np.asarray(psi, np.float64)
  batch, channels = psi.shape[0], psi.shape[-1]
  f = channels // num_groups
  if pairs is None:
    pairs = all_ordered_pairs(f)
  values = []
  for g in range(num_groups):
    total = 0.0
    for i, j in pairs:
      p = psi[..., g * f + i]
      q = psi[..., g * f + j]
      if reduction == 'per_sample':
        total += sum(soft_jaccard(p[b], q[b]) for b in range(batch)) / batch
      elif reduction == 'pooled':
        total += soft_jaccard(p, q)
      else:
        raise ValueError(reduction)
    values.append(total / len(pairs))
  return np.array(values)


def spatial_concentration(psi, *, eps=1e-4):
  """Mean over images and channels of Σ_j ψ_j ‖j − c‖₂ / (Σ_j ψ_j + eps)."""
  psi = np.asarray(psi, np.float64)
  batch, height, width, channels = psi.shape
  values = []
  for b in range(batch):
    for c in range(channels):
      m = psi[b, :, :, c]
      mass = sum(m[y, x] for y in range(height) for x in range(width)) + eps
      cy = sum(y * m[y, x] for y in range(height) for x in range(width)) / mass
      cx = sum(x * m[y, x] for y in range(height) for x in range(width)) / mass
      spread = sum(m[y, x] * math.hypot(y - cy, x - cx)
                   for y in range(height) for x in range(width))
      values.append(spread / mass)
  return sum(values) / len(values)


def group_relevance(kernel, num_groups, *, p=2):
  """[G] entry-wise p-norms of the output-filter groups (free filters dropped)."""
  w = np.asarray(kernel, np.float64)
  f = w.shape[-1] // num_groups
  norms = []
  for g in range(num_groups):
    entries = w[..., g * f:(g + 1) * f].ravel()
    if p == np.inf:
      norms.append(max(abs(v) for v in entries))
    else:
      norms.append(sum(abs(v) ** p for v in entries) ** (1 / p))
  return np.array(norms)


def block_norm(kernel, num_groups, *, p=2, q=1):
  """ℓ_{p,q}: q-norm over groups of the groups' p-norms."""
  norms = group_relevance(kernel, num_groups, p=p)
  if q == np.inf:
    return max(norms)
  return sum(n ** q for n in norms) ** (1 / q)


def orthogonality(kernel):
  """‖W Wᵀ − I‖_F, W = kernel as [C_out, kh·kw·C_in]."""
  k = np.asarray(kernel, np.float64)
  c_out = k.shape[-1]
  rows = [k[..., o].ravel() for o in range(c_out)]  # filter o flattened
  total = 0.0
  for a in range(c_out):
    for b in range(c_out):
      dot = sum(x * y for x, y in zip(rows[a], rows[b]))
      total += (dot - (1.0 if a == b else 0.0)) ** 2
  return math.sqrt(total)
