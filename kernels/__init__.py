"""Triton kernels, one file per op family; installed as ``flowfm_fast.kernels``.

Importing this package never imports triton: each kernel module does, and the ops register
their Triton backend only when triton is importable.
"""
