"""Supervision: the tree as data (`spec`), restart policy (`policy`), the Supervisor actor
(`supervisor`), the gateway root and tree (`gateway`, `tree`), and Thespian hardening
(`hardening`)."""
