"""The student backbone: a timm VisionTransformer whose MLP in chosen blocks is a PC-MoE.

The timm model is kept (`self.vit`), so its dense weights keep timm's names and downstream
code can load them into a plain timm ViT; the MoE blocks sit where their blocks were
(`blocks.<i>`, with the MoE at `blocks.<i>.mlp`), and the task prompts beside the ViT
(`prompts.embedding`). The backbone runs its own block loop, as dinov2's `forward_features`
does: a PC-MoE block takes the prompt as an argument and returns its routing, and gradient
checkpointing wraps that call, so recomputation in backward sees the same prompt.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch.utils.checkpoint import checkpoint

from clasp.config import merge, read_config_file
from clasp.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .pc_moe import PCMoE, PCMoEBlock, PromptModulation, check_backend
from .prompts import TASKS, TaskPrompts, TaskSpec

ATTENTIONS = ("sdpa", "xformers", "eager")
MODULATION = ("all", "moe", "none")

MODEL_DEFAULTS = {
    "img_size": [256, 128],  # (H, W): person aspect ratio
    "patch_size": 16,
    "embed_dim": 384,
    "depth": 12,
    "num_heads": 6,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "drop_path_rate": 0.0,
    "attention": "sdpa",  # sdpa (torch SDPA) | xformers (CUDA, when installed) | eager
    "grad_checkpointing": False,
    "tasks": list(TASKS),
    "prompt_dim": None,  # None: embed_dim
    "prompt": {
        "normalize": True,  # LayerNorm the mixed prompt (see clasp.model.prompts)
        "routing": True,  # the prompt shifts the router logits of every PC-MoE block
        # Blocks whose input the prompt modulates (scale and shift): all | moe | none. "moe"
        # measured best on the demo; modulating every block lowered parsing and pose.
        "modulation": "moe",
        # Per-task routing priors: at initialisation, task i's prompt adds this many logits to
        # experts i*k .. i*k+k-1 (mod E) of every PC-MoE block ("generic" to none), so tasks
        # start on experts of their own; 0: a random prompt projection.
        "routing_prior": 0.0,
    },
    "kernels": "auto",  # auto | triton | reference: route and moe_mlp implementation
    "moe": {
        "blocks": [-2, -1],  # block indexes whose MLP becomes a PC-MoE; negative from the end
        "num_experts": 4,
        "top_k": 2,
        "mlp_ratio": 4.0,  # hidden width of each expert / embed_dim
        "activation": "gelu",
        "normalize": True,  # renormalise the top-k gate weights to sum to 1
    },
}


class XFormersAttention(Attention):
    """timm's Attention with xformers' memory-efficient kernel on CUDA (same weights)."""

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if not x.is_cuda or attn_mask is not None or is_causal:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        from xformers.ops import memory_efficient_attention

        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        p = self.attn_drop.p if self.training else 0.0
        x = memory_efficient_attention(q, k, v, p=p).reshape(B, N, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


def model_config(config: dict | str | None = None) -> dict:
    """The full model config: MODEL_DEFAULTS <- config. `config` may be a model config, a
    training config (its "model" entry is used) or the path of a YAML file of either."""
    if isinstance(config, str):
        config = read_config_file(config)
    config = dict(config or {})
    if "model" in config and isinstance(config["model"], dict):
        config = config["model"]
    unknown = sorted(set(config) - set(MODEL_DEFAULTS))
    if unknown:
        raise KeyError(f"unknown model config keys {unknown}; known: {sorted(MODEL_DEFAULTS)}")
    return merge(MODEL_DEFAULTS, config)


def _whole(value, minimum: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_model_config(cfg: dict) -> None:
    """Raise ValueError naming the `model.` key whose value cannot build a backbone (sizes,
    divisibility, expert counts), before any weight is allocated. `cfg`: a full model config
    (`model_config`)."""
    patch = cfg["patch_size"]
    if not _whole(patch):
        raise ValueError(f"model.patch_size must be a positive integer, got {patch!r}")
    size = cfg["img_size"]
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(map(_whole, size))):
        raise ValueError(f"model.img_size must be [height, width] in pixels, got {size!r}")
    if size[0] % patch or size[1] % patch:
        raise ValueError(
            f"model.img_size {list(size)} must be a multiple of model.patch_size {patch} on "
            f"both sides; e.g. {[max(patch, s // patch * patch) for s in size]}"
        )
    for key in ("embed_dim", "depth", "num_heads"):
        if not _whole(cfg[key]):
            raise ValueError(f"model.{key} must be a positive integer, got {cfg[key]!r}")
    dim, heads = cfg["embed_dim"], cfg["num_heads"]
    if dim % heads:
        divisors = [h for h in range(1, min(dim, 16) + 1) if dim % h == 0]
        raise ValueError(
            f"model.embed_dim {dim} must be divisible by model.num_heads {heads}; heads that "
            f"divide it: {', '.join(map(str, divisors))}"
        )
    if not (isinstance(cfg["mlp_ratio"], int | float) and cfg["mlp_ratio"] > 0):
        raise ValueError(f"model.mlp_ratio must be positive, got {cfg['mlp_ratio']!r}")
    if not 0 <= cfg["drop_path_rate"] < 1:
        raise ValueError(f"model.drop_path_rate must be in [0, 1), got {cfg['drop_path_rate']}")
    if cfg["prompt_dim"] is not None and not _whole(cfg["prompt_dim"]):
        raise ValueError(
            f"model.prompt_dim must be a positive integer or null, got {cfg['prompt_dim']!r}"
        )
    moe = cfg["moe"]
    if not _whole(moe["num_experts"]):
        raise ValueError(
            f"model.moe.num_experts must be a positive integer, got {moe['num_experts']!r}"
        )
    if not (_whole(moe["top_k"]) and moe["top_k"] <= moe["num_experts"]):
        raise ValueError(
            f"model.moe.top_k must be in [1, model.moe.num_experts={moe['num_experts']}], got "
            f"{moe['top_k']!r}"
        )
    if not (isinstance(moe["mlp_ratio"], int | float) and moe["mlp_ratio"] > 0):
        raise ValueError(f"model.moe.mlp_ratio must be positive, got {moe['mlp_ratio']!r}")


class ClaspViT(nn.Module):
    """PC-MoE ViT backbone. See `forward_tokens` and `extract`."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = cfg = model_config(config)
        check_model_config(cfg)
        if cfg["attention"] not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {cfg['attention']!r}")
        if cfg["attention"] == "xformers":
            try:
                import xformers.ops  # noqa: F401
            except ImportError as error:
                raise ImportError(
                    "model.attention=xformers needs the xformers package (pip install "
                    "'clasp-triton[xformers]'); use model.attention=sdpa otherwise"
                ) from error
        self.img_size = tuple(cfg["img_size"])
        self.patch_size = int(cfg["patch_size"])
        self.vit = VisionTransformer(
            img_size=self.img_size,
            patch_size=self.patch_size,
            num_classes=0,
            global_pool="token",
            embed_dim=cfg["embed_dim"],
            depth=cfg["depth"],
            num_heads=cfg["num_heads"],
            mlp_ratio=cfg["mlp_ratio"],
            qkv_bias=cfg["qkv_bias"],
            drop_path_rate=cfg["drop_path_rate"],
            dynamic_img_size=True,  # local crops run at their own size
            attn_layer=XFormersAttention if cfg["attention"] == "xformers" else Attention,
        )
        for block in self.vit.blocks:
            block.attn.fused_attn = cfg["attention"] != "eager"
        self.grad_checkpointing = bool(cfg["grad_checkpointing"])
        dim = cfg["embed_dim"]
        prompt_dim = cfg["prompt_dim"] or dim
        conditioning = cfg["prompt"]
        self.prompts = TaskPrompts(cfg["tasks"], prompt_dim, normalize=conditioning["normalize"])
        moe = cfg["moe"]
        depth = cfg["depth"]
        self.moe_blocks = sorted({i % depth for i in moe["blocks"] if -depth <= i < depth})
        if len(self.moe_blocks) != len(set(moe["blocks"])):
            raise ValueError(
                f"moe.blocks {moe['blocks']} must be distinct indexes in [-{depth}, {depth})"
            )
        for i in self.moe_blocks:
            layer = PCMoE(
                dim,
                int(dim * moe["mlp_ratio"]),
                moe["num_experts"],
                moe["top_k"],
                prompt_dim,
                activation=moe["activation"],
                normalize=moe["normalize"],
                prompt_routing=conditioning["routing"],
                backend=cfg["kernels"],
            )
            self.vit.blocks[i] = PCMoEBlock(self.vit.blocks[i], layer)
        self.init_routing_priors()
        self.modulated_blocks = self._modulated_blocks(conditioning["modulation"], depth)
        self.modulation = nn.ModuleDict(
            {str(i): PromptModulation(prompt_dim, dim) for i in self.modulated_blocks}
        )
        self.default_task: TaskSpec = None
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), False)

    @torch.no_grad()
    def init_routing_priors(self) -> None:
        """Set each PC-MoE block's prompt projection so that task i's (normalised) prompt
        gives its routing prior (see MODEL_DEFAULTS["prompt"]["routing_prior"]): the
        least-norm w_prompt with prompts(one_hot(i)) @ w_prompt = prior[i]. Call it again
        after changing the prompt embeddings (e.g. `TaskPrompts.init_from_text`)."""
        strength = float(self.config["prompt"]["routing_prior"])
        layers = [layer for layer in self.moe_layers if layer.w_prompt is not None]
        if strength == 0 or not layers:
            return
        prompts = self.prompts(torch.eye(len(self.tasks))).float()  # (n_tasks, prompt_dim)
        for layer in layers:
            E, k = layer.num_experts, layer.top_k
            prior = torch.zeros(len(self.tasks), E)
            for i, task in enumerate(t for t in self.tasks if t != "generic"):
                prior[self.tasks.index(task), [(i * k + j) % E for j in range(k)]] = strength
            layer.w_prompt.copy_(torch.linalg.pinv(prompts) @ prior)

    def _modulated_blocks(self, spec: str, depth: int) -> list[int]:
        if spec not in MODULATION:
            raise ValueError(f"model.prompt.modulation must be one of {MODULATION}, got {spec!r}")
        return {"all": list(range(depth)), "moe": list(self.moe_blocks), "none": []}[spec]

    # -- properties ---------------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.prompts.tasks

    @property
    def moe_layers(self) -> list[PCMoE]:
        return [self.vit.blocks[i].mlp for i in self.moe_blocks]

    def set_kernel_backend(self, backend: str) -> None:
        """Switch every MoE layer between "auto", "triton" and "reference" kernels."""
        for layer in self.moe_layers:
            layer.backend = check_backend(backend)
        self.config["kernels"] = backend

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of keeping them."""
        self.grad_checkpointing = enable
        self.config["grad_checkpointing"] = enable

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of the patch size "
                f"{self.patch_size}; resize or crop the images first"
            )
        return height // self.patch_size, width // self.patch_size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) RGB -> the normalised float input of `extract`."""
        return (images.float() / 255.0 - self.pixel_mean) / self.pixel_std

    # -- forward ------------------------------------------------------------------------------
    def forward_tokens(
        self, images: torch.Tensor, task_weights: torch.Tensor
    ) -> tuple[torch.Tensor, list]:
        """images (B, 3, H, W) normalised, task_weights (B, n_tasks) ->
        (tokens (B, 1 + gh*gw, D) after the final norm, one `Routing` per MoE block)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        self.grid_size(*images.shape[2:])
        prompt = self.prompts(task_weights)
        vit = self.vit
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        routings = []
        for i, block in enumerate(vit.blocks):
            if str(i) in self.modulation:
                x = self.modulation[str(i)](x, prompt)
            args = (x, prompt) if isinstance(block, PCMoEBlock) else (x,)
            out = checkpoint(block, *args, use_reentrant=False) if recompute else block(*args)
            if isinstance(block, PCMoEBlock):
                x, routing = out
                routings.append(routing)
            else:
                x = out
        return vit.norm(x), routings

    def forward(self, images: torch.Tensor, task: TaskSpec = None) -> torch.Tensor:
        """(B, 3, H, W) normalised -> pooled features (B, D) for `task` (see `extract`)."""
        return self.extract(images, task)[0]

    def extract(
        self, images: torch.Tensor, task: TaskSpec = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features for downstream tasks.

        Args:
            images: (B, 3, H, W) float, normalised with IMAGENET_MEAN / IMAGENET_STD (`normalize`);
                H and W multiples of the patch size (other sizes than img_size interpolate
                the position embeddings).
            task: a task name, a {task: weight} mix, a list of B names, a (n_tasks,) or
                (B, n_tasks) weight tensor; None = `default_task` (set by `load_backbone`),
                else "generic".
        Returns:
            pooled (B, D): the class token; patches (B, gh, gw, D): the patch tokens on their
            grid (gh = H / patch, gw = W / patch), both after the final norm.
        """
        B, _, H, W = images.shape
        gh, gw = self.grid_size(H, W)
        task = self.default_task if task is None else task
        weights = self.prompts.weights(task, B, images.device)
        tokens, _ = self.forward_tokens(images, weights)
        prefix = self.vit.num_prefix_tokens
        return tokens[:, 0], tokens[:, prefix:].reshape(B, gh, gw, -1)

    def no_weight_decay(self) -> set[str]:
        return {f"vit.{name}" for name in self.vit.no_weight_decay()} | {"prompts.embedding"}


def build_backbone(config: dict | str | None = None, *, seed: int | None = None) -> ClaspViT:
    """A randomly initialised backbone from a model config, a training config or a YAML path
    (the random-init baseline); `seed` makes the initialisation reproducible."""
    if seed is None:
        return ClaspViT(model_config(config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClaspViT(model_config(config))
