pytest_plugins = ["harness.fixtures", "harness.s3", "harness.mlflow"]
