"""Plumbing every benchmark shares: processes (:mod:`.procs`), timing (:mod:`.timing`) and output (:mod:`.output`)."""
