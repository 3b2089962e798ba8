export * from "./codec.js";
export * from "./client.js";
