"""The pieces of ``scripts/gpu_check.py``: what a lent GPU must settle about the pack, run as one command.

- ``plan``: the rows (what each checks), the two size profiles (full size on a GPU, tiny with ``--smoke``), the
  ComfyUI memory modes and the time caps. Imports nothing but the standard library.
- ``parent``: starts one worker process per memory mode, enforces each row's time cap (a row past it is killed
  with its worker and reported "timed out"; the rest run in a fresh worker), collects the results.
- ``report``: the printed table and the JSON file.
- ``worker``: imports ComfyUI in-process the way its ``main.py`` starts (argv, cuda_malloc, DynamicVRAM), then
  the pack as ``comfyui_npo``, and runs rows.
- ``models``, ``measure``, ``rows``: random-weight models loaded by ComfyUI's own loader, VRAM meters and spies,
  the rows themselves (worker side only: they import torch and ComfyUI).

Nothing here imports ``tests/``.
"""
