"""Mutations of parsed JSON objects for the table-driven validation tests: break ONE field of a good input."""


def setitem(*keys_and_value):
    """mutate(obj): obj[k1][k2]... = value."""
    *keys, value = keys_and_value

    def mutate(obj):
        for key in keys[:-1]:
            obj = obj[key]
        obj[keys[-1]] = value
    return mutate


def delitem(*keys):
    def mutate(obj):
        for key in keys[:-1]:
            obj = obj[key]
        del obj[keys[-1]]
    return mutate
