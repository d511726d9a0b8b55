"""GPU kinds and the links between them, as the planner needs them.

Peak TFLOP/s come from `phi1.training.metrics.PEAK_TFLOPS` (looked up by the GPU's name, as training does);
this module adds what that table lacks: memory, HBM bandwidth, and how many GPUs a node holds.

Link bandwidths are the bus bandwidths a ring collective reaches per GPU in practice (nccl-tests "busbw" for
large messages), not the marketing bidirectional totals: NVLink 3 (A100) 600 GB/s bidirectional reaches
~230 GB/s; NVLink 4 (H100) 900 GB/s reaches ~360 GB/s; PCIe 4 x16 ~22 GB/s; PCIe 5 ~45 GB/s. Between nodes a
ring runs at what one GPU's NIC carries (one NIC per GPU, as on DGX / HGX nodes): InfiniBand HDR 200 Gb/s
~24 GB/s, NDR 400 Gb/s ~48 GB/s; 100 GbE shared by a node's 8 GPUs ~1.5 GB/s each.
"""

from __future__ import annotations

from dataclasses import dataclass

from phi1.training.metrics import peak_tflops


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
    runtime_overhead_gib: float = 1.5
    """Memory no tensor accounts for: CUDA context (~0.5 GiB), NCCL buffers, caching-allocator slack."""

    def peak_tflops(self, precision: str) -> float:
        """Peak dense TFLOP/s at `precision`, from phi1.training.metrics.PEAK_TFLOPS.

        Raises:
            ValueError: no peak is known for this GPU at this precision.
        """
        peak = peak_tflops(self.name, precision)
        if peak is None:
            raise ValueError(f"no peak TFLOP/s for {self.name!r} at {precision!r} in phi1.training.metrics.PEAK_TFLOPS")
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
