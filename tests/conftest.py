"""Test-session set-up shared by every folder.

Without a GPU, Triton kernels can only run in its interpreter; the variable must be set before anything
imports triton, so it is set here, first.
"""
import os
import shutil

if not shutil.which("nvidia-smi"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
