// Runs once, on the first start with an empty data volume (docker-entrypoint-initdb.d), as the
// root user. The gateway gets a user of its own that can read and write its database and
// nothing else (SECURITY_GUIDE.md "MongoDB in production"); the root user stays for operators.
const user = process.env.MONGO_GATEWAY_USERNAME;
const password = process.env.MONGO_GATEWAY_PASSWORD;
const database = process.env.MONGO_GATEWAY_DATABASE;
if (!user || !password || !database) {
  throw new Error("MONGO_GATEWAY_USERNAME, MONGO_GATEWAY_PASSWORD and MONGO_GATEWAY_DATABASE must be set");
}
db.getSiblingDB("admin").createUser({
  user: user,
  pwd: password,
  roles: [{ role: "readWrite", db: database }],
});
print(`created MongoDB user ${user} (readWrite on ${database})`);
