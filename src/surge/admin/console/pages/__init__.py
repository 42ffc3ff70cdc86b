"""The console's pages, a module per area; ``surge.admin.console.routes`` includes each
``router`` (no prefix of their own: the console's ``/admin`` applies)."""
