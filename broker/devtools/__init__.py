"""Tools for development, never loaded by ``qbo-broker serve``.

``dev`` (the broker against a fake Intuit, with demo companies), ``fake_intuit``
(the QuickBooks OAuth simulator) and ``fleet_simulation`` (``qbo-broker simulate``).
"""
