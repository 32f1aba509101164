"use strict";
// The Express twin of examples/raw_wsgi.py: the same routes, its sessions kept by
// express-session in Redis (connect-redis) or PostgreSQL (connect-pg-simple), so that
// tests/test_express.py can check that wsgisession's SESSION_FORMAT=express shares them.
//
// Settings (environment):
//   PORT          port to listen on, on 127.0.0.1 (default 3000)
//   SECRET        the session secret; a comma-separated list rotates keys (the first signs)
//   STORE         redis | postgres
//   REDIS_URL     for STORE=redis; PREFIX is the key prefix (default "sess:")
//   DATABASE_URL  for STORE=postgres; TABLE is the table (default "session")
//   MAX_AGE       the session's idle lifetime in milliseconds (default one day)

const express = require("express");
const session = require("express-session");

const env = process.env;
const secrets = (env.SECRET || "").split(",").map((s) => s.trim()).filter(Boolean);
if (secrets.length === 0) {
  console.error("SECRET is not set");
  process.exit(2);
}
const maxAge = Number(env.MAX_AGE || 86400000);

async function makeStore() {
  if (env.STORE === "redis") {
    const { createClient } = require("redis");
    const { RedisStore } = require("connect-redis");
    const client = createClient({ url: env.REDIS_URL || "redis://127.0.0.1:6379" });
    client.on("error", (err) => console.error("redis:", err.message));
    await client.connect();
    return { store: new RedisStore({ client, prefix: env.PREFIX || "sess:" }), close: () => client.quit() };
  }
  if (env.STORE === "postgres") {
    const pg = require("pg");
    const PgStore = require("connect-pg-simple")(session);
    const pool = new pg.Pool({ connectionString: env.DATABASE_URL, max: 4 });
    const store = new PgStore({
      pool,
      tableName: env.TABLE || "session",
      createTableIfMissing: true,
      pruneSessionInterval: false,
    });
    return { store, close: () => pool.end() };
  }
  throw new Error(`STORE must be redis or postgres, not ${JSON.stringify(env.STORE)}`);
}

async function main() {
  const { store, close } = await makeStore();
  const app = express();
  app.use(express.urlencoded({ extended: false }));
  app.use(
    session({
      store,
      secret: secrets.length === 1 ? secrets[0] : secrets,
      resave: false,
      saveUninitialized: false,
      cookie: { maxAge, httpOnly: true, sameSite: "lax" },
    }),
  );

  app.get("/api/session", (req, res) => {
    res.json({ user: req.session.user ?? null, count: req.session.count ?? 0 });
  });

  app.post("/login", (req, res, next) => {
    const username = String((req.body && req.body.username) || "").trim();
    if (!username) {
      res.status(400).type("text/plain").send("username is required\n");
      return;
    }
    // A new session id at login: a cookie planted before is worth nothing.
    req.session.regenerate((err) => {
      if (err) return next(err);
      req.session.user = username;
      res.redirect(303, "/");
    });
  });

  app.post("/counter", (req, res) => {
    req.session.count = (req.session.count || 0) + 1;
    res.redirect(303, "/");
  });

  app.post("/logout", (req, res, next) => {
    req.session.destroy((err) => {
      if (err) return next(err);
      res.clearCookie("connect.sid", { path: "/" });
      res.redirect(303, "/");
    });
  });

  const port = Number(env.PORT || 3000);
  const server = app.listen(port, "127.0.0.1", () => {
    console.log(`listening on http://127.0.0.1:${port}`);
  });
  const stop = () => {
    server.close(() => Promise.resolve(close()).finally(() => process.exit(0)));
    server.closeAllConnections();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
