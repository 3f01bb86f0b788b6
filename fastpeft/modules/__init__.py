"""Drop-in layers. Modules hold parameters and merge state; the math lives in fastpeft.ops."""
