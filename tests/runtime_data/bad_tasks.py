"""Task samplers returning the wrong form, for the bad-input tests of tests/test_meta.py."""


from problems.meta.quadratic import quadratic_tasks


def mismatched(count, generator, d=4):
    tasks = quadratic_tasks(count, generator, d)
    tasks["query"]["w"] = tasks["query"].pop("v")
    return tasks


def one_task(count, generator, d=4):
    return quadratic_tasks(1, generator, d)
