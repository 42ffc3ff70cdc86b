"""The audit log: who did what to which subject, before and after, in the actor's
transaction. Every domain records through ``surge.audit.service.audit``."""
