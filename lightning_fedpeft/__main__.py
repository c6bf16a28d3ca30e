"""``python -m lightning_fedpeft`` runs the CLI (also what ``torchrun -m lightning_fedpeft`` starts)."""

from lightning_fedpeft.cli import main

main()
