"""GPU kinds and the links between them, as the planner needs them.

`PEAK_TFLOPS` holds each device's peak dense TFLOP/s by precision, looked up by the name CUDA reports; training
reads it for MFU (phi1.training.metrics re-exports it). `GPU_KINDS` adds what the planner needs beyond the
peak: memory, HBM bandwidth, and how many GPUs a node holds.

Link bandwidths are the bus bandwidths a ring collective reaches per GPU in practice (nccl-tests "busbw" for
large messages), not the marketing bidirectional totals: NVLink 3 (A100) 600 GB/s bidirectional reaches
~230 GB/s; NVLink 4 (H100) 900 GB/s reaches ~360 GB/s; PCIe 4 x16 ~22 GB/s; PCIe 5 ~45 GB/s. Between nodes a
ring runs at what one GPU's NIC carries (one NIC per GPU, as on DGX / HGX nodes): InfiniBand HDR 200 Gb/s
~24 GB/s, NDR 400 Gb/s ~48 GB/s; 100 GbE shared by a node's 8 GPUs ~1.5 GB/s each.
"""

from __future__ import annotations

from dataclasses import dataclass

# Peak dense TFLOP/s per device (no 2:4 sparsity), by the precision of the matmuls. fp32 means plain IEEE
# fp32 (TF32 tensor-core figures are not used: phi1 does not enable TF32). Matched against the device name
# as CUDA reports it, most specific pattern first.
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM; "NVIDIA H100 80GB HBM3"
    ("H200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}),
    ("V100", {"fp16": 125.0, "fp32": 15.7}),
    ("MI300X", {"bf16": 1307.0, "fp16": 1307.0, "fp32": 163.4}),
    ("MI250X", {"bf16": 383.0, "fp16": 383.0, "fp32": 47.9}),
]

# The ordering above matters: "GH200" must not be read as "H200" first, nor "H100 PCIe" as "H100".
_MATCH_ORDER = sorted(PEAK_TFLOPS, key=lambda item: -len(item[0]))


def peak_tflops(name: str, precision: str, override: float | None = None) -> float | None:
    """Peak dense TFLOP/s of the device called `name` at `precision`; `override` wins; None when unknown."""
    if override is not None:
        return override
    for pattern, peaks in _MATCH_ORDER:
        if pattern.lower() in name.lower():
            return peaks.get(precision)
    return None


# CUDA context (~0.5 GiB), NCCL buffers and caching-allocator slack on a GPU: memory no tensor accounts for.
DEFAULT_RUNTIME_OVERHEAD_GIB = 1.5


@dataclass(frozen=True)
class GPUKind:
    """One accelerator model."""

    name: str
    """Its name as CUDA reports it (matched against PEAK_TFLOPS)."""
    memory_gib: float
    """Device memory."""
    hbm_gbps: float
    """Memory bandwidth, GB/s (bounds the optimizer step)."""
    gpus_per_node: int = 8
    """GPUs of one node, joined by the intra-node link."""
    default_link: str = "nvlink3"
    """Intra-node link of the usual server for this GPU."""
    runtime_overhead_gib: float = DEFAULT_RUNTIME_OVERHEAD_GIB
    """Memory no tensor accounts for: CUDA context (~0.5 GiB), NCCL buffers, caching-allocator slack."""

    def peak_tflops(self, precision: str) -> float:
        """Peak dense TFLOP/s at `precision`, from PEAK_TFLOPS.

        Raises:
            ValueError: no peak is known for this GPU at this precision.
        """
        peak = peak_tflops(self.name, precision)
        if peak is None:
            raise ValueError(f"no peak TFLOP/s for {self.name!r} at {precision!r} in phi1.planning.hardware.PEAK_TFLOPS")
        return peak


GPU_KINDS: dict[str, GPUKind] = {
    "A100-40GB": GPUKind("NVIDIA A100-SXM4-40GB", 40, 1555),
    "A100-80GB": GPUKind("NVIDIA A100-SXM4-80GB", 80, 2039),
    "A100-80GB-PCIe": GPUKind("NVIDIA A100 80GB PCIe", 80, 1935, default_link="pcie4"),
    "H100-SXM": GPUKind("NVIDIA H100 80GB HBM3", 80, 3350, default_link="nvlink4"),
    "H100-PCIe": GPUKind("NVIDIA H100 PCIe", 80, 2000, default_link="pcie5"),
    "H200": GPUKind("NVIDIA H200", 141, 4800, default_link="nvlink4"),
    "L40S": GPUKind("NVIDIA L40S", 48, 864, default_link="pcie4"),
    "L4": GPUKind("NVIDIA L4", 24, 300, default_link="pcie4"),
    "V100-32GB": GPUKind("Tesla V100-SXM2-32GB", 32, 900, default_link="nvlink2"),
    "MI300X": GPUKind("AMD Instinct MI300X", 192, 5300, default_link="infinity-fabric"),
}


@dataclass(frozen=True)
class Link:
    """A link kind: the bus bandwidth a ring collective reaches per GPU, and the latency of one collective step."""

    name: str
    gbps: float
    """GB/s per GPU (10^9 bytes)."""
    latency_us: float
    """Per collective launch and hop, microseconds."""


INTRA_NODE_LINKS: dict[str, Link] = {
    "nvlink2": Link("nvlink2", 130, 8),
    "nvlink3": Link("nvlink3", 230, 8),
    "nvlink4": Link("nvlink4", 360, 8),
    "infinity-fabric": Link("infinity-fabric", 300, 10),
    "pcie4": Link("pcie4", 22, 15),
    "pcie5": Link("pcie5", 45, 15),
}

INTER_NODE_LINKS: dict[str, Link] = {
    "ib-hdr": Link("ib-hdr", 24, 20),
    "ib-ndr": Link("ib-ndr", 48, 20),
    "roce-200g": Link("roce-200g", 22, 25),
    "ethernet-100g": Link("ethernet-100g", 1.5, 40),
}


def gpu_kind(name: str) -> GPUKind:
    """The GPU kind called `name` (case-insensitive key of GPU_KINDS).

    Raises:
        ValueError: naming the known kinds.
    """
    for key, kind in GPU_KINDS.items():
        if key.lower() == name.lower():
            return kind
    raise ValueError(f"unknown GPU kind {name!r}; known kinds are {sorted(GPU_KINDS)}")


def link(name: str, inter_node: bool = False) -> Link:
    """The intra-node (or, with `inter_node`, inter-node) link called `name`.

    Raises:
        ValueError: naming the known links.
    """
    table = INTER_NODE_LINKS if inter_node else INTRA_NODE_LINKS
    if name not in table:
        where = "inter-node" if inter_node else "intra-node"
        raise ValueError(f"unknown {where} link {name!r}; known links are {sorted(table)}")
    return table[name]


@dataclass(frozen=True)
class Cluster:
    """`count` GPUs of one kind, `gpus_per_node` to a node joined by `intra`, nodes joined by `inter`."""

    gpu: GPUKind
    count: int
    intra: Link
    inter: Link

    @property
    def gpus_per_node(self) -> int:
        return min(self.gpu.gpus_per_node, self.count)

    def ring_link(self, group_size: int, stride: int = 1) -> Link:
        """The link a ring over `group_size` ranks, `stride` apart, is limited by: the intra-node link when the
        whole group fits in one node, else the inter-node one (the slowest hop sets a ring's pace)."""
        if group_size <= 1 or group_size * stride <= self.gpus_per_node:
            return self.intra
        return self.inter


def cluster(gpu: str, count: int, intra: str | None = None, inter: str = "ib-hdr") -> Cluster:
    """A Cluster from names; `intra` defaults to the GPU kind's usual link.

    Raises:
        ValueError: unknown names, or count < 1.
    """
    if count < 1:
        raise ValueError(f"GPU count must be >= 1, got {count}")
    kind = gpu_kind(gpu)
    return Cluster(kind, count, link(intra or kind.default_link), link(inter, inter_node=True))
