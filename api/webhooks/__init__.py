"""Signed webhooks: a job's or batch's subscriber URL checked at submit (`urls.py`), and the
deliverer that sends what storage recorded (`deliverer.py`), signed per Standard Webhooks."""
