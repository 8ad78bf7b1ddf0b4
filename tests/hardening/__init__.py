"""Tests for supervisors.hardening: each Thespian 4.0.1 defect reproduced, then shown fixed."""
