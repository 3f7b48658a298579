"""Stage 3: conversion runs and their outputs (Arrow shards + manifest, canonical JSONL), written atomically."""
