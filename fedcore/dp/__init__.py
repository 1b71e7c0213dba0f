"""Differential privacy: accounting (torch-free) and distributed integer noise."""
