"""diffusers' Shap-E text-to-3D pipeline with random weights, built from architecture configs only.

Used by bench/shap_e_init.py (full-size openai/shap-e architecture: the real model's time and memory)
and by the tests (tests/tiny_models.py, a tiny one). Nothing is downloaded.

The renderer's marching-cubes lookup table (`MeshDecoder.cases` / `masks`) is a buffer that the real
checkpoint supplies and random initialisation leaves at zero (no triangles at all), so it is built here:
for each of the 256 inside/outside patterns of a cube's corners, the iso-surface polygons are traced
through the cube faces (on a face with two diagonal inside corners, each inside corner is cut off on
its own, which keeps neighbouring cubes consistent) and fanned into at most 5 triangles.
"""
from __future__ import annotations

import torch

from bench.random_sd import char_tokenizer

# openai/shap-e (text300M in diffusers' layout): a 24-layer transformer over 1024 latent tokens of
# width 1024, conditioned on the projected CLIP ViT-L/14 text embedding (768); the output carries
# mean and variance (2 x 1024).
FULL_PRIOR_CONFIG = dict(
    num_attention_heads=16, attention_head_dim=64, num_layers=24, embedding_dim=1024, num_embeddings=1024,
    additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer", encoder_hid_proj_type=None,
    added_emb_type=None, time_embed_dim=4096, embedding_proj_dim=768, clip_embed_dim=2048,
)
FULL_TEXT_ENCODER_CONFIG = dict(  # CLIP ViT-L/14 text tower with its projection
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768,
    vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1,
    pad_token_id=1,
)
FULL_RENDERER_CONFIG: dict = {}  # ShapERenderer's defaults are the transmitter's STF MLP (d_latent 1024)
SCHEDULER_CONFIG = dict(beta_schedule="exp", num_train_timesteps=1024, prediction_type="sample",
                        use_karras_sigmas=True, clip_sample=True, clip_sample_range=1.0)

TINY_WIDTH = 32  # latent width and text width of the test model; 32 latent rows = 4 renderer layers x 8
TINY_PRIOR_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=TINY_WIDTH, num_embeddings=32,
    additional_embeddings=0, time_embed_act_fn="gelu", norm_in_type="layer", encoder_hid_proj_type=None,
    added_emb_type=None, time_embed_dim=4 * TINY_WIDTH, embedding_proj_dim=TINY_WIDTH, clip_embed_dim=2 * TINY_WIDTH,
)
TINY_TEXT_ENCODER_CONFIG = dict(
    hidden_size=TINY_WIDTH, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
    projection_dim=TINY_WIDTH, vocab_size=1000, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
    pad_token_id=1,
)
TINY_RENDERER_CONFIG = dict(param_shapes=((8, 93), (8, 8), (8, 8), (8, 8)), d_latent=TINY_WIDTH, d_hidden=8)

# Cube corner c sits at (c & 1, c >> 1 & 1, c >> 2 & 1) (the bit order of MeshDecoder's bitmasks); edge e
# joins CUBE_EDGES[e], in the order of diffusers' _create_flat_edge_indices (4 along x, 4 along y, 4 along z).
CUBE_EDGES = ((0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7))
CUBE_FACES = ((0, 2, 6, 4), (1, 3, 7, 5), (0, 1, 5, 4), (2, 3, 7, 6), (0, 1, 3, 2), (4, 5, 7, 6))  # corner cycles
MAX_TRIANGLES = 5


def _edge(a: int, b: int) -> int:
    return CUBE_EDGES.index((min(a, b), max(a, b)))


def _face_segments(face: tuple[int, ...], inside: list[bool]) -> list[tuple[int, int]]:
    """Pairs of crossed edges joined on one face: each inside corner of an ambiguous face is cut off."""
    ring = [(face[i], face[(i + 1) % 4]) for i in range(4)]
    crossed = [_edge(a, b) for a, b in ring if inside[a] != inside[b]]
    if len(crossed) == 2:
        return [(crossed[0], crossed[1])]
    if len(crossed) == 4:
        return [(_edge(face[i - 1], face[i]), _edge(face[i], face[(i + 1) % 4])) for i in range(4) if inside[face[i]]]
    return []


def _polygons(pattern: int) -> list[list[int]]:
    """Closed loops of crossed edges for one corner pattern."""
    inside = [bool(pattern >> c & 1) for c in range(8)]
    neighbours: dict[int, list[int]] = {}
    for face in CUBE_FACES:
        for a, b in _face_segments(face, inside):
            neighbours.setdefault(a, []).append(b)
            neighbours.setdefault(b, []).append(a)
    loops, seen = [], set()
    for start in sorted(neighbours):  # every crossed edge has exactly two neighbours: follow the cycle
        if start in seen:
            continue
        loop, previous, current = [], neighbours[start][1], start
        while not loop or current != start:
            loop.append(current)
            first, second = neighbours[current]
            previous, current = current, (second if first == previous else first)
        seen.update(loop)
        loops.append(loop)
    return loops


def marching_cubes_table() -> tuple[torch.Tensor, torch.Tensor]:
    """MeshDecoder's lookup table: cases [256, 5, 3] (local edge ids per triangle), masks [256, 5]."""
    cases = torch.zeros(256, MAX_TRIANGLES, 3, dtype=torch.long)
    masks = torch.zeros(256, MAX_TRIANGLES, dtype=torch.bool)
    for pattern in range(256):
        triangles = [(loop[0], loop[i], loop[i + 1]) for loop in _polygons(pattern) for i in range(1, len(loop) - 1)]
        if len(triangles) > MAX_TRIANGLES:
            raise RuntimeError(f"corner pattern {pattern} needs {len(triangles)} triangles")
        for i, triangle in enumerate(triangles):
            cases[pattern, i] = torch.tensor(triangle)
            masks[pattern, i] = True
    return cases, masks


def random_shap_e_pipeline(size: str = "full", seed: int = 0):
    """ShapEPipeline with random weights: size 'full' (openai/shap-e architecture) or 'tiny' (tests)."""
    from diffusers import HeunDiscreteScheduler, PriorTransformer, ShapEPipeline
    from diffusers.pipelines.shap_e import ShapERenderer
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    if size not in ("full", "tiny"):
        raise ValueError(f"size must be 'full' or 'tiny', got {size!r}")
    full = size == "full"
    text_config = FULL_TEXT_ENCODER_CONFIG if full else TINY_TEXT_ENCODER_CONFIG
    torch.manual_seed(seed)
    prior = PriorTransformer(**(FULL_PRIOR_CONFIG if full else TINY_PRIOR_CONFIG))
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    renderer = ShapERenderer(**(FULL_RENDERER_CONFIG if full else TINY_RENDERER_CONFIG))
    cases, masks = marching_cubes_table()
    renderer.mesh_decoder.cases.copy_(cases)
    renderer.mesh_decoder.masks.copy_(masks)
    return ShapEPipeline(prior=prior, text_encoder=text_encoder, tokenizer=char_tokenizer(text_config["vocab_size"]),
                         scheduler=HeunDiscreteScheduler(**SCHEDULER_CONFIG), shap_e_renderer=renderer)
