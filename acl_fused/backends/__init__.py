"""Backends (one module or package each), registered by name in acl_fused/dispatch.py."""
