"""Extraction: paired teacher/base states (capture), the folder that holds them (store), the fusion
map (fusion) and the tree + bank built from them (build)."""
