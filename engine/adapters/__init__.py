"""Checked first, before any module here imports `kernels`: otherwise a foreign package of that name fails as an
ImportError of some name deep down."""
from engine import check_kernels

check_kernels()
