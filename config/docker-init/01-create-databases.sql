-- Run once by the postgres image when the volume is empty.
-- Creates the dev and test databases, each owned by its own role.
-- The passwords are local development placeholders; set your own in config/.env.<env>.
CREATE ROLE precog_dev LOGIN PASSWORD 'precog_dev_local';
CREATE ROLE precog_test LOGIN PASSWORD 'precog_test_local';
CREATE DATABASE precog_dev OWNER precog_dev;
CREATE DATABASE precog_test OWNER precog_test;
