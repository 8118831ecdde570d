"""Anatomy: template registration and MARS (Microbleed Anatomical Rating Scale) regions."""
