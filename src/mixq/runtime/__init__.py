"""Inference on low-bit kernels: packed modules, ``apply_kernels``, speed and latency measurement."""

from mixq.runtime.apply import KernelReport, apply_kernels, plan_kernels
from mixq.runtime.kernels import BACKENDS, KERNELS, KernelError, choose_kernel, serves

__all__ = ["BACKENDS", "KERNELS", "KernelError", "KernelReport", "apply_kernels", "choose_kernel", "plan_kernels", "serves"]
