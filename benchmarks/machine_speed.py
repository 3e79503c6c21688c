"""How fast this machine multiplies matrices: the yardstick printed with the demo's stage times, so runs on
different machines (the 20-minute budget is for "2 CPU cores", which differ by 2x) can be compared.

    python benchmarks/machine_speed.py          # fp32 GFLOP/s of a 512 x 512 matmul on torch's threads
"""
import time

import torch


def matmul_gflops(size: int = 512, seconds: float = 1.0) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(5):  # warm-up: thread pool, caches
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * size ** 3 * n / (time.perf_counter() - start) / 1e9


if __name__ == "__main__":
    print(f"machine: {matmul_gflops():.0f} GFLOP/s fp32 matmul (512 x 512, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()})")
