"""Shared core of patchq: settings, images, layouts, backbones, PatchCore, artifacts, SQL."""
